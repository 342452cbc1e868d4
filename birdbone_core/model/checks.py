"""Cheap file-level validation run before any heavy transformers load.

transformers reports damaged files with messages that rarely name the file (or fails after minutes of
work), so each check here reads only headers and sizes and raises a BirdboneError of the form
"<file>: <problem>".
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Literal

from birdbone_core.errors import BirdboneError

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
# Names transformers can load as pickle checkpoints, and other pickle formats we recognise (to refuse).
_PICKLE_LOADABLE = ("pytorch_model.bin", "pytorch_model-*.bin")
_PICKLE_OTHER = ("*.pt", "*.pth", "model*.bin", "consolidated*.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the format's own limit


def read_config(path: Path) -> dict:
    """Parse config.json, with parse errors reported as file + line + column."""
    if not path.is_file():
        raise BirdboneError(f"{path.parent}: no config.json; not a Hugging Face model directory")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BirdboneError(f"{path}: invalid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from exc
    except UnicodeDecodeError as exc:
        raise BirdboneError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise BirdboneError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if not isinstance(config, dict):
        raise BirdboneError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def check_weights(directory: Path, allow_pickle: bool) -> Literal["safetensors", "pickle"]:
    """Validate the weight files of an HF directory; say which format transformers should load."""
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        for shard, names in _read_index(index).items():
            check_safetensors(shard, expect_tensors=names, index=index)
        return "safetensors"
    singles = sorted(directory.glob("*.safetensors"))
    if singles:
        for file in singles:
            check_safetensors(file)
        return "safetensors"

    loadable = sorted({p for pat in _PICKLE_LOADABLE for p in directory.glob(pat)})
    other = sorted({p for pat in _PICKLE_OTHER for p in directory.glob(pat)} - set(loadable))
    if not loadable and not other and not (directory / PICKLE_INDEX).is_file():
        raise BirdboneError(
            f"{directory}: no weights found (expected model.safetensors, or sharded *.safetensors with "
            f"{SAFETENSORS_INDEX})"
        )
    names = ", ".join(p.name for p in (loadable + other)[:4]) or PICKLE_INDEX
    if not allow_pickle:
        raise BirdboneError(
            f"{directory}: weights are only in pickle format ({names}), which can run arbitrary code when "
            "loaded; convert them to safetensors, or pass allow_pickle=True (CLI: --allow-pickle) if you "
            "trust the source"
        )
    pickle_index = directory / PICKLE_INDEX
    if pickle_index.is_file():
        for shard in _read_index(pickle_index):
            if shard.stat().st_size == 0:
                raise BirdboneError(f"{shard}: empty weights file")
        return "pickle"
    if not loadable:
        raise BirdboneError(
            f"{directory}: transformers loads pickle weights only as pytorch_model.bin (found {names})"
        )
    return "pickle"


def check_tokenizer_files(directory: Path) -> None:
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise BirdboneError(f"{directory}: no tokenizer files (expected one of: {', '.join(_TOKENIZER_FILES)})")


def _read_index(index: Path) -> dict[Path, set[str]]:
    """Shard path -> tensor names, from a sharded-checkpoint index; every shard must exist."""
    data = read_config(index)  # same JSON error reporting as config.json
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise BirdboneError(f"{index}: no weight_map (or it is empty)")
    shards: dict[Path, set[str]] = {}
    for tensor, shard_name in weight_map.items():
        if not isinstance(shard_name, str) or "/" in shard_name or "\\" in shard_name:
            raise BirdboneError(f"{index}: bad shard name {shard_name!r} for tensor {tensor}")
        shards.setdefault(index.parent / shard_name, set()).add(tensor)
    for shard in shards:
        if not shard.is_file():
            raise BirdboneError(f"{index}: shard {shard.name} is missing")
    return shards


def check_safetensors(path: Path, expect_tensors: set[str] | None = None, index: Path | None = None) -> None:
    """Header and size check of one .safetensors file (no tensor data is read)."""

    def corrupt(reason: str) -> BirdboneError:
        return BirdboneError(f"{path}: corrupt safetensors file ({reason})")

    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise corrupt(f"{size} bytes, too short for a header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > _MAX_SAFETENSORS_HEADER or 8 + header_len > size:
            raise corrupt(f"header length {header_len} does not fit in a {size}-byte file")
        raw = fh.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        ends = [
            int(info["data_offsets"][1]) for name, info in header.items() if name != "__metadata__"
        ]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError) as exc:
        raise corrupt(f"unreadable header: {str(exc)[:120]}") from exc
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        raise corrupt(f"truncated: {size} bytes, header needs {expected}")
    if size > expected:
        raise corrupt(f"{size - expected} unexpected bytes after the tensor data")

    # The library's own validation (dtypes, shapes vs offsets, overlapping ranges).
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            names = set(fh.keys())
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise corrupt(" ".join(str(exc).split())[:160]) from exc
    if expect_tensors:
        missing = sorted(expect_tensors - names)
        if missing:
            raise BirdboneError(
                f"{path}: tensor {missing[0]} listed in {index.name if index else 'the index'} is missing "
                f"({len(missing)} missing in all)"
            )


def check_gguf(path: Path, supported_archs: list[str]) -> str:
    """Validate a GGUF file's header, metadata and tensor extents; return its architecture."""
    from birdbone_core.model.gguf_header import GgufHeaderError, read_gguf_header

    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
        if len(magic) == 4 and magic != b"GGUF":
            raise BirdboneError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
        header = read_gguf_header(path)
    except GgufHeaderError as exc:
        if str(exc).startswith("unsupported version"):
            raise BirdboneError(f"{path}: {str(exc).replace('version', 'GGUF version')} (supported: 2, 3)") from exc
        raise BirdboneError(f"{path}: truncated or corrupt GGUF ({exc})") from exc
    except OSError as exc:
        raise BirdboneError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if not header.tensors:
        raise BirdboneError(f"{path}: truncated or corrupt GGUF (no tensors)")
    arch = header.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise BirdboneError(f"{path}: GGUF has no general.architecture field")
    if arch not in supported_archs:
        raise BirdboneError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(supported_archs)})"
        )
    return arch
