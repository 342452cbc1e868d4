"""Cheap file-level validation run before any heavy transformers load.

transformers reports damaged files with messages that rarely name the file (or fails after minutes of
work), so each check here reads only headers and sizes and raises a BirdboneError of the form
"<file>: <problem>".
"""
from __future__ import annotations

import json
import math
import re
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
# The largest f16 value: GGUF's F16 tensors and every block format's scales are f16, and no trained LLM
# weight comes near it; beyond it a checkpoint is damaged (a flipped exponent bit), and its norms overflow
# to a uniform distribution (perplexity = vocabulary size) instead of failing.
F16_MAX = 65504.0


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


# config.json fields that must be positive when present (a negative eps gives NaN everywhere; a layer
# count of -1 or 0 builds a model that silently ignores the checkpoint).
_POSITIVE_INTS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings")
_POSITIVE_FLOATS = ("rms_norm_eps", "layer_norm_eps", "rope_theta")
_EPSILONS = ("rms_norm_eps", "layer_norm_eps")         # a norm's epsilon is tiny; >= 1 flattens every norm
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def check_config_values(config: dict, where: str) -> None:
    """Refuse out-of-range sizes and constants in a config (and in its text_config, for Gemma 3)."""
    for cfg, prefix in ((config, ""), (config.get("text_config") or {}, "text_config.")):
        if not isinstance(cfg, dict):
            continue
        for key in _POSITIVE_INTS:
            v = cfg.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise BirdboneError(f"{where}: {prefix}{key} must be a positive integer, got {v!r}")
        for key in _POSITIVE_FLOATS:
            v = cfg.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf")):
                raise BirdboneError(f"{where}: {prefix}{key} must be a positive number, got {v!r}")
            if key in _EPSILONS and v is not None and v >= 1:
                raise BirdboneError(f"{where}: {prefix}{key} must be below 1 (a norm's epsilon), got {v!r}")
        vocab = cfg.get("vocab_size")
        for key in _TOKEN_IDS:
            ids = cfg.get(key)
            for i in ids if isinstance(ids, list) else [ids]:
                if i is not None and (isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < (vocab or 2 ** 62)):
                    raise BirdboneError(f"{where}: {prefix}{key} must be a token id below vocab_size {vocab}, got {i!r}")


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
    for name in ("tokenizer.json", "tokenizer_config.json"):      # JSON the tokenizer libraries parse later
        if (directory / name).is_file():
            read_config(directory / name)


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

    if path.is_symlink() and not path.exists():
        raise BirdboneError(f"{path}: a symlink to {path.readlink()}, which does not exist")
    if not path.is_file():
        raise BirdboneError(f"{path}: not a regular file")
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise corrupt(f"{size} bytes, too short for a header")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > _MAX_SAFETENSORS_HEADER or 8 + header_len > size:
                raise corrupt(f"header length {header_len} does not fit in a {size}-byte file")
            raw = fh.read(header_len)
    except OSError as exc:
        raise BirdboneError(f"{path}: cannot read ({exc.strerror or exc})") from exc
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


_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files of a safetensors checkpoint (the index's shards, or every *.safetensors)."""
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        return sorted(_read_index(index))
    return sorted(directory.glob("*.safetensors"))


def check_tensors(directory: Path, config: dict) -> None:
    """Read a safetensors checkpoint one tensor at a time (never the whole model): refuse NaN/Inf, naming the
    tensor, and a checkpoint whose decoder layers are not the ones config.json declares (transformers
    would silently drop extra layers, or fill missing ones with random weights)."""
    from birdbone_core.model.tensors import read_header, read_tensor

    layers: set[int] = set()
    shapes: dict[str, tuple[int, ...]] = {}
    for file in safetensors_files(directory):
        for name, entry in read_header(file).items():
            if (m := _LAYER_INDEX.search(name)) is not None:
                layers.add(int(m.group(1)))
            shapes[name] = entry.shape
            check_values(name, read_tensor(entry), str(file))
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    n = text.get("num_hidden_layers")
    if isinstance(n, int) and layers and layers != set(range(n)):
        extra, missing = sorted(layers - set(range(n))), sorted(set(range(n)) - layers)
        what = (f"holds layer(s) {_span(extra)} that config.json (num_hidden_layers={n}) has no place for" if extra
                else f"lacks layer(s) {_span(missing)} of the {n} config.json declares")
        raise BirdboneError(f"{directory}: the checkpoint {what}; the weights do not match the config")
    _check_shapes(directory, config, shapes)


def check_values(name: str, t, where: str) -> None:
    """Refuse NaN/Inf in a float tensor, and magnitudes beyond F16_MAX, naming the tensor."""
    import torch

    if not t.is_floating_point() or t.numel() == 0:
        return
    lo, hi = (float(x) for x in torch.aminmax(t))     # one pass, no tensor-sized temporary; NaN propagates
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = int((~torch.isfinite(t)).sum())
        kinds = "/".join(k for k, f in (("NaN", torch.isnan), ("Inf", torch.isinf)) if f(t).any())
        raise BirdboneError(f"{where}: weights {name} holds {bad} non-finite value(s) ({kinds})")
    peak = max(-lo, hi)
    if peak > F16_MAX:
        raise BirdboneError(f"{where}: weights {name} hold values up to {peak:.3g}, beyond any trained model's "
                            f"(and f16's {F16_MAX:g}); the checkpoint is damaged")


def _span(xs: list[int]) -> str:
    return f"{xs[0]}" if len(xs) == 1 else f"{xs[0]}..{xs[-1]}"


def meta_model(config: dict, text_only: bool = False):
    """The model a config.json describes, built on the meta device (module names and shapes, no memory, no
    weights); text_only: the text model of Gemma 3's multimodal config. None when transformers cannot build
    it from the config alone (the load that follows reports why, with context)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.for_model(**config)
        if text_only and cfg.model_type == "gemma3":
            cfg = cfg.get_text_config()
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg)
    except Exception:
        return None


def _check_shapes(directory: Path, config: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    """Shapes the config implies (meta_model) against the checkpoint's, for every tensor name both have."""
    skeleton = meta_model(config)
    if skeleton is None:
        return
    expected = {n: tuple(t.shape) for n, t in skeleton.state_dict().items()}
    for name, shape in expected.items():
        if name in shapes and shape != shapes[name]:
            raise BirdboneError(f"{directory}: weight {name} has shape {_dims(shapes[name])} in the checkpoint, "
                                f"config.json implies {_dims(shape)}; the weights do not match the config")
    if len(expected.keys() & shapes.keys()) < len(expected) // 2:
        return                     # the checkpoint names its tensors otherwise (e.g. a multimodal wrapper)
    if getattr(skeleton.config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    ignored = [re.compile(p) for p in getattr(skeleton, "_keys_to_ignore_on_load_unexpected", None) or ()]
    missing = sorted(expected.keys() - shapes.keys())
    unexpected = sorted(n for n in shapes.keys() - expected.keys() if not any(p.search(n) for p in ignored))
    if missing:
        raise BirdboneError(f"{directory}: {len(missing)} weight(s) config.json needs are missing from the checkpoint "
                            f"(e.g. {missing[0]}); the weights do not match the config")
    if unexpected:
        raise BirdboneError(f"{directory}: {len(unexpected)} weight(s) in the checkpoint that config.json has no "
                            f"place for (e.g. {unexpected[0]}); the weights do not match the config")


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))
