"""Write an in-memory transformers causal LM to a llama.cpp GGUF file.

Tensors are streamed: the header and tensor table are written first (sizes come from the format table
in `birdbone_core.quant.formats`), then each tensor is converted and written in turn, so peak memory is
one tensor on top of the model. The file is written under a temporary name in the target directory and
moved into place with os.replace() only when complete (birdbone_core.atomic.staged_file); on any error
the temporary file is removed and an existing file at `out_path` is left untouched.
"""
from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

import birdbone_core
from birdbone_core.atomic import staged_file
from birdbone_core.errors import BirdboneError
from birdbone_core.export.arch import TensorPlan, arch_for, for_widths, model_dims, plan_tensors, write_arch_metadata
from birdbone_core.export.vocab import write_vocab
from birdbone_core.model.checks import F16_MAX
from birdbone_core.progress import progress_bar
from birdbone_core.quant.formats import can_apply, get_format
from birdbone_core.runtime import drop_mapped_pages

# out_type -> (format of 2-D weights, general.file_type, fallback format for rows that don't fit the blocks)
OUT_TYPES: dict[str, tuple[str, gguf.LlamaFileType, str | None]] = {
    "f32": ("F32", gguf.LlamaFileType.ALL_F32, None),
    "f16": ("F16", gguf.LlamaFileType.MOSTLY_F16, None),
    "bf16": ("BF16", gguf.LlamaFileType.MOSTLY_BF16, None),
    "q8_0": ("Q8_0", gguf.LlamaFileType.MOSTLY_Q8_0, "F16"),
}


@dataclass
class ExportResult:
    path: Path
    n_bytes: int
    tensor_types: dict[str, str]  # gguf tensor name -> format name ("F32", "Q8_0", ...)
    bits_per_weight: float  # tensor data bits / weights, all tensors
    n_weights: int = 0
    fallbacks: dict[str, str] = field(default_factory=dict)  # gguf name -> "Q8_0->F16 (row length 72 ...)"
    notes: dict[str, str] = field(default_factory=dict)  # gguf name -> other change, e.g. FFN zero-padding
    tokenizer_source: str = ""


def _choose_format(plan: TensorPlan, out_type: str, fallbacks: dict[str, str]) -> str:
    fmt, _, fallback = OUT_TYPES[out_type]
    if len(plan.shape) < 2:
        return "F32"  # norms, biases, rope factors: llama.cpp keeps 1-D tensors in F32
    row = plan.shape[-1]
    if can_apply(fmt, row):
        return fmt
    assert fallback is not None
    fallbacks[plan.gguf_name] = f"{fmt}->{fallback} (row length {row} not a multiple of {get_format(fmt).block_size})"
    return fallback




def check_storable(name: str, a: np.ndarray, fmt: str) -> None:
    """Refuse a tensor that would reach the file as NaN/Inf: non-finite values, or (for F16 and the block
    formats) magnitudes beyond what f16 values and f16 block scales can hold."""
    if not a.size:
        return
    lo, hi = float(a.min()), float(a.max())            # NaN propagates; no array-sized temporary
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise BirdboneError(f"tensor {name} holds {int(a.size - np.isfinite(a).sum())} NaN/Inf value(s); not "
                            f"writing a GGUF that llama.cpp would compute garbage with")
    if fmt not in ("F32", "BF16"):
        peak = max(-lo, hi)
        if peak > F16_MAX:
            raise BirdboneError(f"tensor {name} holds values up to {peak:.3g}, beyond the f16 range ({F16_MAX:g}) "
                                f"that {fmt} stores; export it as f32 or fix the weights")


def _encode(a: np.ndarray, fmt: str) -> np.ndarray:
    f = get_format(fmt)
    if f.name == "F32":
        return a.astype(np.float32, copy=False)
    if f.name == "F16":
        return a.astype(np.float16)
    return gguf.quants.quantize(a, f.qtype)


def _types_summary(types: dict[str, str]) -> str:
    return ", ".join(f"{k}:{v}" for k, v in sorted(Counter(types.values()).items()))


def export_gguf(model: torch.nn.Module, tokenizer: Any, out_path: str | os.PathLike, *, out_type: str = "f16",
                source_gguf: Path | None = None,
                extra_metadata: dict[str, str | int | float] | None = None,
                quantized: dict[str, tuple[str, np.ndarray]] | None = None,
                state: Mapping[str, torch.Tensor] | None = None, header_only: bool = False) -> ExportResult:
    """Write `model` (a transformers causal LM in memory) as a GGUF file stock llama.cpp can run.

    out_type: f32 | f16 | bf16 | q8_0 for 2-D weights; 1-D tensors stay F32; a weight whose row length
    is not a multiple of the format's block falls back (q8_0 -> f16) and is listed in `fallbacks`.
    source_gguf: the GGUF file the model was loaded from; its tokenizer.* keys are copied verbatim.
    extra_metadata: more string/int/float keys (e.g. `birdbone.recipe`).
    quantized: mixed-type export: GGUF tensor name -> (block type, packed bytes [rows, row bytes]) as
    `birdbone_core.quant.engine.quantize_model` makes them; those tensors are written as given, the
    others per out_type. general.file_type then names the type holding the most bytes.
    state: the model's tensors when they are not in `model` (a streamed model on the meta device:
    birdbone_core.model.stream.StreamedModel.checkpoint_state), read one at a time as they are written.
    header_only: write nothing; `n_bytes` is what the file would hold before its tensor data (header,
    metadata, tensor table): a file-size budget minus it is what the tensors may take.
    """
    out_type = out_type.lower()
    if out_type not in OUT_TYPES:
        raise BirdboneError(f"unknown GGUF out_type {out_type!r}; choose one of {', '.join(OUT_TYPES)}")
    config = model.config
    spec = arch_for(config)
    out_path = Path(out_path)
    out_dir = out_path.parent if str(out_path.parent) else Path(".")
    if not out_dir.is_dir():
        raise BirdboneError(f"output directory {out_dir} does not exist")
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise BirdboneError(f"output directory {out_dir} is not writable")
    if source_gguf is not None:
        source_gguf = Path(source_gguf)
        if not source_gguf.is_file():
            raise BirdboneError(f"source GGUF {source_gguf} does not exist")

    state = model.state_dict() if state is None else state
    dims = model_dims(config, state)
    spec = for_widths(spec, dims)        # llama with per-layer FFN widths or head counts -> llama.cpp's deci
    if dims.n_head_layers and not spec.per_layer_sizes:
        raise BirdboneError(f"layers with different head counts ({list(dims.n_head_kv_layers)} KV heads): llama.cpp "
                            f"builds every {spec.name} layer with layer 0's; only llama-family models take them")
    plans = plan_tensors(model, spec, dims, config, state)

    if header_only:
        with tempfile.TemporaryDirectory(dir=out_dir) as d:
            result = _write(model, tokenizer, Path(d) / "header.gguf", spec, dims, config, plans, out_type,
                            source_gguf, extra_metadata, quantized or {}, header_only=True)
            align = gguf.GGUF_DEFAULT_ALIGNMENT              # the data starts at the next aligned offset
            result.n_bytes = -(-(Path(d) / "header.gguf").stat().st_size // align) * align
        return result
    try:
        with staged_file(out_path) as tmp:  # renamed onto out_path only if the block completes
            result = _write(model, tokenizer, tmp, spec, dims, config, plans, out_type, source_gguf, extra_metadata,
                            quantized or {})
    except OSError as e:
        raise BirdboneError(f"writing {out_path} failed: {e}") from e
    result.path = out_path
    result.n_bytes = out_path.stat().st_size
    return result


def _write(model: torch.nn.Module, tokenizer: Any, path: Path, spec, dims, config, plans: list[TensorPlan],
           out_type: str, source_gguf: Path | None, extra_metadata: dict | None,
           quantized: dict[str, tuple[str, np.ndarray]], header_only: bool = False) -> ExportResult:
    _, file_type, _ = OUT_TYPES[out_type]
    _check_quantized(quantized, plans)
    if quantized:
        file_type = _mixed_file_type(quantized)
    writer = gguf.GGUFWriter(path, spec.name)
    try:
        origin = str(getattr(config, "name_or_path", None) or getattr(model, "name_or_path", None) or "")
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        extra_tensors = write_arch_metadata(writer, spec, config, dims)
        tok_source, source_name = write_vocab(writer, tokenizer, dims.n_vocab, source_gguf)
        writer.add_name(source_name or Path(origin).name or spec.name)

        # tensor table: every tensor's final format and size are known before any data is converted
        for tname, arr in extra_tensors.items():
            plans.append(TensorPlan(tname, "", arr.shape, lambda a=arr: a))
        fallbacks: dict[str, str] = {}
        types: dict[str, str] = {}
        n_weights = n_data = 0
        for p in plans:
            fmt = quantized[p.gguf_name][0] if p.gguf_name in quantized else _choose_format(p, out_type, fallbacks)
            types[p.gguf_name] = fmt
            f = get_format(fmt)
            n = int(np.prod(p.shape))
            nbytes = f.n_bytes(n)
            n_weights += n
            n_data += nbytes
            if fmt in ("F32", "F16"):
                dtype = np.dtype(np.float32 if fmt == "F32" else np.float16)
                writer.add_tensor_info(p.gguf_name, p.shape, dtype, nbytes)
            else:
                byte_shape = (*p.shape[:-1], p.shape[-1] // f.block_size * f.type_size)
                writer.add_tensor_info(p.gguf_name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=f.qtype)

        writer.add_string("birdbone.version", birdbone_core.__version__)
        writer.add_string("birdbone.source", source_gguf.name if source_gguf else (origin or "in-memory model"))
        writer.add_string("birdbone.out_type", "mixed" if quantized else out_type)
        writer.add_string("birdbone.tensor_types", _types_summary(types))
        writer.add_string("birdbone.tokenizer", tok_source)
        if fallbacks:
            writer.add_string("birdbone.fallbacks", "; ".join(f"{k}: {v}" for k, v in fallbacks.items()))
        notes = {p.gguf_name: p.note for p in plans if p.note}
        if notes:
            writer.add_string("birdbone.notes", "; ".join(f"{k}: {v}" for k, v in notes.items()))
        for key, value in (extra_metadata or {}).items():
            _add_extra(writer, key, value)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        if header_only:
            plans = []
        with progress_bar(f"writing GGUF ({out_type})", total=len(plans)) as advance:
            for p in plans:
                q = quantized.get(p.gguf_name)
                src = p.load()
                check_storable(p.gguf_name, src, types[p.gguf_name])
                data = q[1] if q is not None else _encode(src, types[p.gguf_name])
                writer.write_tensor_data(data)
                drop_mapped_pages(data)         # encodings read from a scratch file leave memory once written
                advance()
    finally:
        writer.close()
    bpw = 8.0 * n_data / n_weights if n_weights else 0.0
    return ExportResult(path, 0, types, bpw, n_weights, fallbacks, notes, tok_source)


# the type holding most bytes of a mixed file -> general.file_type (llama.cpp only displays it)
_MIXED_FILE_TYPES = {
    "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1",
    "Q8_0": "MOSTLY_Q8_0", "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_M", "Q4_K": "MOSTLY_Q4_K_M",
    "Q5_K": "MOSTLY_Q5_K_M", "Q6_K": "MOSTLY_Q6_K", "F16": "MOSTLY_F16", "F32": "ALL_F32",
}


def _mixed_file_type(quantized: dict[str, tuple[str, np.ndarray]]) -> gguf.LlamaFileType:
    by_type: Counter = Counter()
    for fmt, data in quantized.values():
        by_type[get_format(fmt).name] += data.nbytes
    top = by_type.most_common(1)[0][0]
    return gguf.LlamaFileType[_MIXED_FILE_TYPES.get(top, "MOSTLY_F16")]


def _check_quantized(quantized: dict[str, tuple[str, np.ndarray]], plans: list[TensorPlan]) -> None:
    """Every pre-quantized tensor must exist and hold exactly the bytes its shape takes in its type."""
    shapes = {p.gguf_name: p.shape for p in plans}
    for name, (fmt, data) in quantized.items():
        if name not in shapes:
            raise BirdboneError(f"quantized tensor {name!r} is not a tensor of this model")
        f = get_format(fmt)
        shape = shapes[name]
        if f.name not in ("F32", "F16") and (len(shape) < 2 or not can_apply(f.name, shape[-1])):
            raise BirdboneError(f"{name}: shape {shape} cannot be stored as {f.name}")
        if f.name in ("F32", "F16"):
            if data.dtype != np.dtype(np.float32 if f.name == "F32" else np.float16) or tuple(data.shape) != shape:
                raise BirdboneError(f"{name}: expected {f.name} data of shape {shape}, got {data.dtype} {data.shape}")
            continue
        want = (*shape[:-1], shape[-1] // f.block_size * f.type_size)
        if data.dtype != np.uint8 or tuple(data.shape) != want:
            raise BirdboneError(f"{name}: expected packed {f.name} bytes of shape {want}, got {data.dtype} "
                                f"{tuple(data.shape)}")


def _add_extra(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    if not isinstance(key, str) or not key or key.startswith(("general.architecture", "GGUF.")):
        raise BirdboneError(f"invalid extra metadata key {key!r}")
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_int64(key, value) if not 0 <= value < 2**32 else writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        raise BirdboneError(f"extra metadata {key!r}: value must be str, int or float, not {type(value).__name__}")
