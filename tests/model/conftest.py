"""Session fixtures: tiny random checkpoints for every supported architecture, built once.

Nothing is fetched from a hub; see tinymodels.py for how they are made.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from tinymodels import ARCHS, build_model, build_tokenizer, write_llama_gguf

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def _tiny_dirs(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("tiny-models")
    dirs = {}
    for i, arch in enumerate(ARCHS):
        d = root / arch
        build_model(arch, seed=i).save_pretrained(d)
        tiny_tokenizer.save_pretrained(d)
        dirs[arch] = d
    return dirs


@pytest.fixture
def tiny_dir(_tiny_dirs, tmp_path):
    """make(arch) -> a private copy of that arch's checkpoint directory (tests may damage it)."""

    def make(arch: str = "llama") -> Path:
        dst = tmp_path / arch
        if not dst.exists():
            shutil.copytree(_tiny_dirs[arch], dst)
        return dst

    return make


@pytest.fixture(scope="session")
def pristine_dirs(_tiny_dirs):
    """Read-only use: arch -> checkpoint directory shared by the whole session."""
    return _tiny_dirs


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_tokenizer):
    """(path of a tiny F32 llama GGUF, the HF model it was written from)."""
    model = build_model("llama", seed=7)
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_llama_gguf(path, model, tiny_tokenizer)
    return path, model
