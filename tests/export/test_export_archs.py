"""Tiny random qwen2 / qwen3 / gemma3 / mistral / llama variants: exported F32, llama.cpp logits == torch."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from birdbone_core.export import export_gguf

PROMPT = "def area(r):\n    return 3.14159 * r ** 2  # circle, not a square"


def _common(vocab: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                bos_token_id=0, eos_token_id=1, pad_token_id=2)


def build(kind: str, vocab: int) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    c = _common(vocab)
    configs = {
        "qwen2": ("qwen2", dict(tie_word_embeddings=True)),  # q/k/v biases
        "qwen3": ("qwen3", dict(head_dim=32, tie_word_embeddings=False)),  # q/k norms, head_dim != hidden/heads
        "mistral": ("mistral", dict(head_dim=32, sliding_window=None)),
        # sliding window 4 < prompt length, mixed layer pattern, query scale != 1/sqrt(head_dim), softcap
        "gemma3": ("gemma3_text", dict(num_hidden_layers=3, head_dim=32, sliding_window=4,
                                       layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                       query_pre_attn_scalar=24, final_logit_softcapping=3.0)),
        # attention biases + Llama 3 RoPE scaling (rope_freqs tensor) + a row length (72) Q8_0 can't take
        "llama3": ("llama", dict(attention_bias=True, intermediate_size=72, rope_parameters=dict(
            rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64))),
    }
    model_type, extra = configs[kind]
    config = AutoConfig.for_model(model_type, **{**c, **extra})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(len(kind))
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms and biases, logits of order 1
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() == 1 else 0.08))
    return model


GGUF_ARCH = {"qwen2": "qwen2", "qwen3": "qwen3", "mistral": "llama", "gemma3": "gemma3", "llama3": "llama"}


@pytest.fixture(scope="module")
def exported(tiny_llama, tmp_path_factory):
    _, tok = tiny_llama
    out = tmp_path_factory.mktemp("archs")
    result = {}
    for kind in GGUF_ARCH:
        model = build(kind, len(tok))
        result[kind] = (model, export_gguf(model, tok, out / f"{kind}.gguf", out_type="f32"))
    return result


@pytest.mark.parametrize("kind", list(GGUF_ARCH))
def test_metadata(exported, kind):
    model, res = exported[kind]
    reader = gguf.GGUFReader(res.path)
    arch = GGUF_ARCH[kind]
    f = reader.fields
    assert f["general.architecture"].contents() == arch
    assert f[f"{arch}.block_count"].contents() == model.config.num_hidden_layers
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    assert f[f"{arch}.attention.key_length"].contents() == head_dim
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) == (not model.config.tie_word_embeddings)
    if kind == "gemma3":
        assert f["gemma3.attention.sliding_window"].contents() == 4
        assert f["gemma3.attention.sliding_window_pattern"].contents() == [True, False, True]
        assert f["gemma3.final_logit_softcapping"].contents() == pytest.approx(3.0)
        assert f["gemma3.rope.freq_base_swa"].contents() == pytest.approx(10000.0)
    if kind == "llama3":
        assert "rope_freqs.weight" in names and "blk.0.attn_q.bias" in names


def test_gemma3_norms_are_stored_plus_one(exported):
    model, res = exported["gemma3"]
    reader = gguf.GGUFReader(res.path)
    t = {x.name: np.array(x.data) for x in reader.tensors}
    sd = model.state_dict()
    np.testing.assert_array_equal(t["blk.0.attn_norm.weight"], sd["model.layers.0.input_layernorm.weight"].numpy() + 1)
    np.testing.assert_array_equal(t["output_norm.weight"], sd["model.norm.weight"].numpy() + 1)
    # query_pre_attn_scalar 24 vs head_dim 32: llama.cpp's fixed 1/sqrt(32) scale is corrected in q_norm
    q = sd["model.layers.0.self_attn.q_norm.weight"].numpy() + 1
    np.testing.assert_allclose(t["blk.0.attn_q_norm.weight"], q * np.sqrt(32 / 24), rtol=1e-6)


def test_q8_0_falls_back_to_f16_for_short_rows(tiny_llama, tmp_path):
    _, tok = tiny_llama
    model = build("llama3", len(tok))
    res = export_gguf(model, tok, tmp_path / "q8.gguf", out_type="q8_0")
    assert res.tensor_types["blk.0.ffn_down.weight"] == "F16"  # rows of 72 weights: not whole 32-blocks
    assert res.tensor_types["blk.0.ffn_up.weight"] == "Q8_0"
    assert set(res.fallbacks) == {f"blk.{i}.ffn_down.weight" for i in range(2)}
    assert "Q8_0->F16" in res.fallbacks["blk.0.ffn_down.weight"]
    assert "birdbone.fallbacks" in gguf.GGUFReader(res.path).fields


@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", list(GGUF_ARCH))
def test_llama_cpp_logits_match_torch(exported, tiny_llama, kind):
    from birdbone_core.eval.llamacpp import llama_logits

    _, tok = tiny_llama
    model, res = exported[kind]
    ids = tok(PROMPT)["input_ids"]
    assert len(ids) > 8  # longer than gemma3's sliding window of 4
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    got = llama_logits(res.path, ids)
    scale = float(np.abs(ref).max())
    assert 0.1 < scale < 100
    # F32 weights; llama.cpp keeps the KV cache in F16, hence ~1e-4 relative rather than 1e-7
    assert np.abs(got[-1] - ref[-1]).max() < 2e-3 * scale, kind
    assert np.abs(got - ref).max() < 5e-3 * scale, kind
    assert got[-1].argmax() == ref[-1].argmax()


@pytest.mark.llamacpp
def test_llama_cpp_runs_the_q8_0_fallback_file(tiny_llama, tmp_path):
    from birdbone_core.eval.llamacpp import llama_logits

    _, tok = tiny_llama
    model = build("llama3", len(tok))
    res = export_gguf(model, tok, tmp_path / "q8.gguf", out_type="q8_0")
    ids = tok(PROMPT)["input_ids"]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    got = llama_logits(res.path, ids)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def _narrow_ffn(model: torch.nn.Module, layer: int, keep: int) -> None:
    """Structured FFN pruning of one layer: keep the first `keep` intermediate channels."""
    mlp = model.model.layers[layer].mlp
    for name in ("gate_proj", "up_proj"):
        old = getattr(mlp, name)
        new = torch.nn.Linear(old.in_features, keep, bias=False)
        new.weight.data = old.weight.data[:keep].clone()
        setattr(mlp, name, new)
    new = torch.nn.Linear(keep, mlp.down_proj.out_features, bias=False)
    new.weight.data = mlp.down_proj.weight.data[:, :keep].clone()
    mlp.down_proj = new


@pytest.mark.llamacpp
@pytest.mark.parametrize("kind", ["mistral", "gemma3"])
def test_narrowed_ffn_layers_export_per_layer_or_zero_padded(tiny_llama, tmp_path, kind):
    """A llama-family model with one narrower layer exports as llama.cpp's deci (a per-layer FFN width);
    gemma3, which llama.cpp builds with one width, is zero-padded to the widest. Both run like torch."""
    from birdbone_core.eval.llamacpp import llama_logits

    _, tok = tiny_llama
    model = build(kind, len(tok))
    _narrow_ffn(model, 1, 64)
    res = export_gguf(model, tok, tmp_path / "n.gguf", out_type="f32")
    f = gguf.GGUFReader(res.path).fields
    if kind == "mistral":
        n_layer = model.config.num_hidden_layers
        assert f["general.architecture"].contents() == "deci"
        assert f["deci.feed_forward_length"].contents() == [128, 64] + [128] * (n_layer - 2)
        assert res.notes == {}
    else:
        arch = GGUF_ARCH[kind]
        assert f[f"{arch}.feed_forward_length"].contents() == 128
        assert res.notes == {f"blk.1.ffn_{p}.weight": "zero-padded FFN 64 -> 128" for p in ("gate", "up", "down")}
    ids = tok(PROMPT)["input_ids"]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    got = llama_logits(res.path, ids)
    assert np.abs(got - ref).max() < 5e-3 * np.abs(ref).max()
