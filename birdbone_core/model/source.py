"""What a user's model spec names (a Hugging Face directory, a GGUF file, an s3:// folder, a hub id), the
architectures birdbone takes, and the cheap checks of a source's files before anything is loaded
(model.load loads it).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from birdbone_core.errors import BirdboneError
from birdbone_core.model import checks

# HF model_type -> llama.cpp GGUF architecture. llama.cpp has no separate mistral graph: it serves
# mistral checkpoints as "llama". "gemma3" is the multimodal wrapper; only its text model is used.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
}
SUPPORTED_GGUF_ARCHS = sorted(set(SUPPORTED_ARCHITECTURES.values()))

# Org/name as on the Hugging Face hub (one slash, no path-ish prefix).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_HUB_HINT = "enable downloads with offline=False (CLI: --online)"
_TRUST_HINT = "trust_remote_code=True (CLI: --trust-remote-code)"


@dataclass
class ModelSource:
    kind: Literal["hf_dir", "gguf", "hub"]
    path: str  # directory, GGUF file path, or hub id

    def describe(self) -> str:
        what = {"hf_dir": "Hugging Face directory", "gguf": "GGUF file", "hub": "hub model"}[self.kind]
        return f"{what} {self.path}"


def supported_list() -> str:
    return ", ".join(SUPPORTED_ARCHITECTURES)


def resolve_source(spec: str, *, offline: bool = True) -> ModelSource:
    """Decide what `spec` names: a local HF directory, a local .gguf file, an s3:// checkpoint folder
    (downloaded into the model cache: birdbone_core.model.remote), or a hub id."""
    if spec.startswith("s3://"):
        from birdbone_core.model.remote import fetch_s3

        spec = str(fetch_s3(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        # A directory with only a GGUF in it (no config.json) is taken as that GGUF file.
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return ModelSource("gguf", str(ggufs[0]))
        return ModelSource("hf_dir", str(path))
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSource("gguf", str(path))
        raise BirdboneError(
            f"{spec}: not a model; give a Hugging Face model directory (with config.json) or a .gguf file"
        )
    if path.exists():                    # a device, FIFO or socket (e.g. /dev/zero)
        raise BirdboneError(f"{spec}: not a regular file or directory; give a model directory or a .gguf file")
    if path.is_symlink():
        raise BirdboneError(f"{spec}: a symlink to {os.readlink(path)}, which does not exist")
    if spec.lower().endswith(".gguf"):
        raise BirdboneError(f"{spec}: GGUF file not found")
    if _HUB_ID.match(spec) and not spec.startswith("."):
        if offline:
            raise BirdboneError(
                f"{spec}: no such local file or directory; as a hub id it would need downloads, which are "
                f"off ({_HUB_HINT})"
            )
        return ModelSource("hub", spec)
    raise BirdboneError(f"{spec}: no such file or directory")


def preflight(source: ModelSource, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> None:
    """The cheap checks of a local source (headers, config, files present), without loading weights:
    lets a step refuse bad input before it creates any output."""
    if source.kind == "gguf":
        checks.check_gguf(Path(source.path), SUPPORTED_GGUF_ARCHS)
    elif source.kind == "hf_dir":
        directory = Path(source.path)
        config = checks.read_config(directory / "config.json")
        check_config(config, str(directory / "config.json"), trust_remote_code)
        weights = checks.check_weights(directory, allow_pickle)
        checks.check_tokenizer_files(directory)
        if weights == "safetensors" and config.get("model_type") in SUPPORTED_ARCHITECTURES:
            checks.check_tensors(directory, config)


def skeleton(source: ModelSource):
    """The model `source` describes, built on the meta device (shapes and module names, no memory, no
    weights read), for checks that need the architecture before any work; None when only a full load
    can tell (hub ids, configs transformers cannot build without the weights) or when building it costs
    too much (a GGUF: transformers parses its whole tokenizer for the config; see gguf_context_length)."""
    if source.kind != "hf_dir":
        return None
    return checks.meta_model(checks.read_config(Path(source.path) / "config.json"), text_only=True)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def stored_dtype(source: ModelSource) -> torch.dtype | None:
    """The float dtype a Hugging Face directory's config.json says its weights are stored in (None: not
    said, or not a directory: a GGUF is dequantized, a hub id not read yet)."""
    if source.kind != "hf_dir":
        return None
    config = checks.read_config(Path(source.path) / "config.json")
    return _DTYPES.get(config.get("dtype") or config.get("torch_dtype"))


def check_config(config: dict, where: str, trust_remote_code: bool) -> None:
    model_type = config.get("model_type")
    if not model_type:
        raise BirdboneError(f"{where}: no model_type field")
    if model_type in SUPPORTED_ARCHITECTURES:
        checks.check_config_values(config, where)
        return
    if config.get("auto_map") and not trust_remote_code:
        raise BirdboneError(
            f"{where}: model_type {model_type!r} is not built into transformers; its config asks for "
            f"custom code (auto_map), which runs only with {_TRUST_HINT}, and birdbone supports only: "
            f"{supported_list()}"
        )
    raise BirdboneError(f"{where}: model_type {model_type!r} is not supported (supported: {supported_list()})")
