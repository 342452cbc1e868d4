"""save_hf writes a plain, reloadable float safetensors directory, atomically."""
from __future__ import annotations

import json

import pytest
import torch
from tinymodels import ARCHS

from birdbone_core.errors import BirdboneError
from birdbone_core.model.load import load_model
from birdbone_core.model.save import save_hf


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_identical(pristine_dirs, tmp_path, arch):
    lm = load_model(str(pristine_dirs[arch]))
    out = tmp_path / "out"
    assert save_hf(lm.model, lm.tokenizer, out) == out
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    again = load_model(str(out))
    a, b = lm.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    tied = bool(lm.model.config.tie_word_embeddings)
    assert (again.model.lm_head.weight is again.model.model.embed_tokens.weight) == tied
    assert again.tokenizer("Hello world")["input_ids"] == lm.tokenizer("Hello world")["input_ids"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dirs left behind


def test_replaces_existing_dir_only_when_complete(pristine_dirs, tmp_path, monkeypatch):
    lm = load_model(str(pristine_dirs["llama"]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    save_hf(lm.model, lm.tokenizer, out)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()

    # A save that fails midway leaves the previous directory untouched.
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(lm.tokenizer), "save_pretrained", boom)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(BirdboneError, match="out: failed to save model .*disk full"):
        save_hf(lm.model, lm.tokenizer, out)
    assert sorted(p.name for p in out.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_gguf_loaded_model_saves_as_plain_float(tiny_gguf, tmp_path):
    from transformers import GgufConfig

    path, original = tiny_gguf
    lm = load_model(str(path))
    # Even if a caller re-attaches the GGUF trace, it is not written out.
    lm.model.config.quantization_config = GgufConfig(gguf_file=path.name)
    save_hf(lm.model, lm.tokenizer, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in cfg and "_model_name_or_path" not in cfg
    again = load_model(str(tmp_path / "out"))
    for name, tensor in original.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], tensor), name


def test_out_dir_is_a_file(pristine_dirs, tmp_path):
    lm = load_model(str(pristine_dirs["llama"]))
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(BirdboneError, match="is not a directory"):
        save_hf(lm.model, lm.tokenizer, f)
