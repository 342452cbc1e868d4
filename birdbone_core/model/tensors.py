"""A safetensors checkpoint read one tensor at a time with plain file reads.

safetensors' own `safe_open` maps the whole file and hands out tensors backed by that mapping: every page
touched stays resident (and counted in the process's RSS) for as long as any tensor of the file lives, so
checking or streaming a model through it costs the model's size in memory. Here each tensor is read into
memory of its own (the bytes its header names) and nothing else is kept.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from birdbone_core.errors import BirdboneError

ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int      # absolute byte offsets in the file
    end: int


def read_metadata(file: Path) -> dict[str, str]:
    """The file's `__metadata__` (string to string)."""
    return _header(file)[1].get("__metadata__") or {}


def _header(file: Path) -> tuple[int, dict]:
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            return n, json.loads(f.read(n))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise BirdboneError(f"{file}: not a readable safetensors file ({type(e).__name__})") from None


def read_header(file: Path) -> dict[str, Entry]:
    """Every tensor's entry in one safetensors file (BirdboneError naming the file when it is not one)."""
    n, header = _header(file)
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        if h["dtype"] not in ST_DTYPES:
            raise BirdboneError(f"{file}: tensor {name} has dtype {h['dtype']}, not a supported one")
        a, b = h["data_offsets"]
        out[name] = Entry(Path(file), ST_DTYPES[h["dtype"]], tuple(h["shape"]), 8 + n + a, 8 + n + b)
    return out


def read_tensor(e: Entry) -> torch.Tensor:
    with open(e.file, "rb") as f:
        f.seek(e.start)
        buf = bytearray(f.read(e.end - e.start))
    if len(buf) != e.end - e.start:
        raise BirdboneError(f"{e.file}: truncated (a tensor's bytes run past the end of the file)")
    if not buf:
        return torch.empty(e.shape, dtype=e.dtype)
    return torch.frombuffer(buf, dtype=e.dtype).reshape(e.shape)


class SafetensorsState(Mapping):
    """The tensors of a checkpoint's files by name, each read from disk when asked for (cast to `dtype`
    when given): a state dict whose memory is the one tensor the caller holds. `shapes` and `stored`
    (dtypes) come from the headers without reading any data."""

    def __init__(self, files: list[Path] | Path, dtype: torch.dtype | None = None):
        if isinstance(files, Path) or isinstance(files, str):
            files = sorted(Path(files).glob("*.safetensors"))
        self.dtype = dtype
        self.entries: dict[str, Entry] = {}
        for f in files:
            self.entries.update(read_header(Path(f)))
        if not self.entries:
            raise BirdboneError(f"{files[0].parent if files else 'checkpoint'}: no .safetensors weights")
        self.shapes = {n: e.shape for n, e in self.entries.items()}
        self.stored = {n: e.dtype for n, e in self.entries.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        t = read_tensor(self.entries[name])
        return t if self.dtype is None or t.dtype == self.dtype else t.to(self.dtype)

    def __contains__(self, name: object) -> bool:      # Mapping's own would read the tensor
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)
