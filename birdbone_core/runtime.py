"""Where a step computes and in what precision: `--device auto|cpu|cuda[:N]` and `--dtype` on the step
commands (cliargs.add_runtime_flags), `runtime: {device, dtype}` in the recipe. Per field the command line
wins over the recipe, the recipe over auto.

    device auto   cuda when torch sees a CUDA device, else cpu; `cuda` without an index is cuda:0, or
                  under torchrun cuda:LOCAL_RANK (each rank its own card, as heal.distributed pins it)
    dtype auto    cpu: float32 (what birdbone always did: CPU results do not change);
                  cuda: the source checkpoint's dtype when it is a half type (bf16 / f16), else bfloat16;
                  a run's own weights (RUN/base, RUN/pruned) keep the dtype they were written in on any
                  device, so the ledger's hashes of them hold whichever machine a later step runs on

The weights live on that device in that dtype; the numerics that need more (Hessians and input
statistics, Cholesky factors, the SparseGPT / GPTQ column loops, KL and log-probs) are computed in float32
(float64 where they always were) on the same device, and their results cast back to the weights' dtype.
What is saved (safetensors, GGUF, the ledger) goes through CPU tensors.
"""
from __future__ import annotations

import gc
import os
import re
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from birdbone_core.errors import BirdboneError

DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_HALF = (torch.bfloat16, torch.float16)


def check_device(text: str) -> str:
    """The device spelling, or ValueError naming the accepted ones (no CUDA check: resolve_device)."""
    if not isinstance(text, str) or not _DEVICE.match(text):
        raise ValueError(f"{text!r} is not a device: use auto, cpu, cuda or cuda:N")
    return text


class Runtime(BaseModel):
    """The recipe's `runtime:` section, and the command line's --device / --dtype (only the fields given
    are set: `merge` reads model_fields_set)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: str = Field("auto", description="'auto' (cuda:0 when torch sees a CUDA device, else cpu), 'cpu', "
                                            "'cuda' or 'cuda:N'")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype the weights live in: 'auto' = float32 on cpu; on cuda the source "
                            "checkpoint's half type (bfloat16 / float16), else bfloat16; a run's own weights "
                            "keep the dtype they were written in. Hessians, Cholesky, the column loops and KL "
                            "run in float32 whatever this is")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device(v)


def merge(flags: Runtime | None, recipe: Runtime | None) -> Runtime:
    """Per field: the command line's (when given) > the recipe's > auto."""
    out = recipe if recipe is not None else Runtime()
    if flags is None:
        return out
    return out.model_copy(update={k: getattr(flags, k) for k in flags.model_fields_set})


def from_flags(device: str | None, dtype: str | None) -> Runtime | None:
    """The command line's runtime: only the flags given are set (None: neither was)."""
    given = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    return Runtime(**given) if given else None


def resolve_device(spec: str = "auto") -> torch.device:
    """'auto' / 'cpu' / 'cuda' / 'cuda:N' -> a torch.device that exists here, or BirdboneError (a user
    mistake: exit 2 with one `error:` line, before any work)."""
    try:
        spec = check_device(spec)
    except ValueError as e:
        raise BirdboneError(f"device: {e}") from None
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise BirdboneError(f"device {spec}: no CUDA device here (torch {torch.__version__} sees none); "
                            f"use --device cpu or --device auto")
    # no index: this process's card, cuda:LOCAL_RANK under torchrun (one rank per card), else cuda:0
    index = int(spec.split(":", 1)[1]) if ":" in spec else int(os.environ.get("LOCAL_RANK", "0"))
    n = torch.cuda.device_count()
    if index >= n:
        raise BirdboneError(f"device {spec}: out of range; this machine has {n} CUDA device(s) "
                            f"(cuda:0..cuda:{n - 1})")
    return torch.device("cuda", index)


def resolve_dtype(spec: str, device: torch.device, source: torch.dtype | None = None,
                  keep: bool = False) -> torch.dtype:
    """The weights' dtype for `spec` on `device`. source: the dtype the checkpoint stores (None: unknown,
    e.g. a GGUF); keep: the checkpoint is a run's own weights, whose dtype auto keeps on every device."""
    if spec not in DTYPES:
        raise BirdboneError(f"dtype {spec!r}: use one of {', '.join(DTYPES)}")
    if spec != "auto":
        return getattr(torch, spec)
    if keep and source is not None:
        return source
    if device.type == "cpu":
        return torch.float32
    return source if source in _HALF else torch.bfloat16


@dataclass(frozen=True)
class Placement:
    """A resolved runtime: the device, and the dtype setting (resolved per checkpoint by dtype_for)."""

    device: torch.device
    dtype: str = "auto"

    def dtype_for(self, source: torch.dtype | None = None, keep: bool = False) -> torch.dtype:
        return resolve_dtype(self.dtype, self.device, source, keep)


def place(flags: Runtime | None, recipe: Runtime | None = None) -> Placement:
    """Command line > recipe > auto, the device checked to exist here."""
    rt = merge(flags, recipe)
    return Placement(resolve_device(rt.device), rt.dtype)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model's weights live (cpu for a model without parameters)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def describe(model: torch.nn.Module) -> dict[str, str]:
    """{"device": "cuda:0", "dtype": "bfloat16"}: where a step's model ran, for its record."""
    p = next(iter(model.parameters()), None)
    dtype = p.dtype if p is not None else torch.float32
    return {"device": str(model_device(model)), "dtype": str(dtype).removeprefix("torch.")}


def release_freed_memory(collect: bool = True) -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim). A layer's tensors are a few to a few
    hundred MB; once glibc has seen one freed it serves such sizes from its heap, which it does not shrink
    by itself. Measured on a 0.6B llama streamed layer by layer (magnitude, bf16): peak RSS 1.52 GB without,
    0.98 GB with. collect: first free what only reference cycles (modules, hooks) keep alive (~0.1 s)."""
    if collect:
        gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def drop_mapped_pages(a) -> None:
    """Hand back the resident pages of the read-only file mapping an array reads from (numpy's memmap, or a
    view of one): a tensor written out of a mapped file would otherwise stay in this process's memory, the
    whole mapped file once every tensor is written. The data stays in the page cache; reading it again
    faults it back in. Anything else (ordinary arrays, writable mappings) is left alone."""
    import mmap

    obj, depth = a, 0
    while obj is not None and depth < 8:
        m = getattr(obj, "_mmap", None)
        if isinstance(m, mmap.mmap) and getattr(obj, "mode", None) == "r" and hasattr(m, "madvise"):
            m.madvise(mmap.MADV_DONTNEED)
            return
        obj, depth = getattr(obj, "base", None), depth + 1


def _libc():
    import ctypes
    import ctypes.util

    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return lib if hasattr(lib, "malloc_trim") else None
    except OSError:            # not glibc (macOS, musl): nothing to trim
        return None


_LIBC = _libc()
