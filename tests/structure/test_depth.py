"""Depth pruning (birdbone_core/structure/depth.py) on the tiny Llama fixture and a tiny random Gemma 3:
scores, drop plan rules, transformers/config consistency, GGUF export run by llama.cpp, exact revert."""
from __future__ import annotations

import gzip
import importlib.util
import math

import gguf
import numpy as np
import pytest
import torch

from birdbone_core.data.corpus import shipped_path
from birdbone_core.data.text import calibration_blocks
from birdbone_core.errors import BirdboneError
from birdbone_core.export import export_gguf
from birdbone_core.model.layers import decoder_layers
from birdbone_core.structure.depth import (
    angular_distance,
    apply_drop,
    block_influence,
    drop_layers,
    kl_per_token,
    layer_importance,
    plan_drop,
    revert_drop,
)

HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python is not installed")
PROMPT = "def area(r):\n    return 3.14159 * r ** 2  # circle, not a square"
G3_TYPES = ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]  # 7 layers, global at 5


@pytest.fixture(scope="module")
def blocks(_tiny_loaded):
    text = gzip.open(shipped_path("calib"), "rt", encoding="utf-8").read()[:20000]
    return calibration_blocks(_tiny_loaded.tokenizer, text, n_samples=4, seq_len=48, seed=0)  # [4, 48]


@pytest.fixture
def llama(tiny):
    """A fresh copy of the trained 4-layer tiny Llama (LlamaForCausalLM)."""
    return tiny.model


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, state) -> bool:
    now = model.state_dict()
    return list(now) == list(state) and all(torch.equal(now[k], state[k]) for k in state)


def _layer_idx(model) -> list[list[int]]:
    return [sorted({m.layer_idx for m in layer.modules() if hasattr(m, "layer_idx")})
            for layer in decoder_layers(model)]


def _logits_match(model, path, ids) -> float:
    from birdbone_core.eval.llamacpp import llama_logits

    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    got = llama_logits(path, ids, n_threads=1)
    scale = float(np.abs(ref).max())
    # same tolerance as tests/export/test_export_archs.py (F32 weights, llama.cpp's F16 KV cache)
    assert np.abs(got[-1] - ref[-1]).max() < 2e-3 * scale
    assert np.abs(got - ref).max() < 5e-3 * scale
    assert got[-1].argmax() == ref[-1].argmax()
    return float(np.abs(got - ref).max() / scale)


def test_pure_scores():
    h = torch.randn(2, 5, 16)
    assert torch.allclose(angular_distance(h, 3 * h), torch.zeros(2, 5), atol=1e-3)
    assert torch.allclose(angular_distance(h, -h), torch.ones(2, 5), atol=1e-3)
    assert torch.allclose(block_influence(h, -h), torch.full((2, 5), 2.0))
    z = torch.randn(3, 7, 11)
    assert kl_per_token(z, z).abs().max() < 1e-6
    assert (kl_per_token(z, torch.randn(3, 7, 11)) > 0).all()


def test_plan_rules():
    # layer 0 and the last are the least important but protected unless allow_ends
    assert plan_drop([0.0, 0.5, 0.2, 0.0], 1, model_type="llama") == (2,)
    assert plan_drop([0.0, 0.5, 0.2, 0.1], 2, model_type="llama", allow_ends=True) == (0, 3)
    # gemma3: the only global layer (5) is the least important; the plan keeps it and every kept type
    scores = [9, 3, 4, 5, 6, 0.1, 9]
    assert plan_drop(scores, 2, model_type="gemma3_text", layer_types=G3_TYPES) == (1, 2)
    with pytest.raises(BirdboneError, match="only 4 of 7"):
        plan_drop(scores, 6, model_type="gemma3_text", layer_types=G3_TYPES)
    for bad, match in [(-1, ">= 0"), (7, "leave none")]:
        with pytest.raises(BirdboneError, match=match):
            plan_drop(scores, bad, model_type="gemma3_text", layer_types=G3_TYPES)
    with pytest.raises(BirdboneError, match="finite"):
        plan_drop([1.0, math.nan, 2.0], 1, model_type="llama")
    with pytest.raises(BirdboneError, match="does not support model_type 'gpt2'"):
        plan_drop([1.0, 2.0, 3.0], 1, model_type="gpt2")


def test_identity_layer_scores_least_important(llama, blocks):
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: an identity block
        decoder_layers(llama)[2].self_attn.o_proj.weight.zero_()
        decoder_layers(llama)[2].mlp.down_proj.weight.zero_()
    s = layer_importance(llama, blocks, batch_size=2, kl=True)
    for metric in ("angular", "bi", "kl"):
        v = s.by(metric)
        assert len(v) == 4 and all(math.isfinite(x) and x >= 0 for x in v), (metric, v)
        assert int(np.argmin(v)) == 2, (metric, v)
        assert v[2] < 1e-5 and min(v[1], v[3]) > 100 * max(v[2], 1e-7), (metric, v)
    assert s.n_tokens == blocks.numel()
    assert plan_drop(s.angular, 1, model_type="llama") == (2,)


def test_drop_nothing_changes_nothing(llama):
    state, cfg = _state(llama), llama.config.to_dict()
    rec = apply_drop(llama, [])
    assert rec.removed == () and _same_state(llama, state) and llama.config.to_dict() == cfg
    revert_drop(llama, rec)
    assert _same_state(llama, state)


def test_drop_one_layer_export_runs_in_llama_cpp_and_reverts(llama, _tiny_loaded, blocks, tmp_path):
    tok = _tiny_loaded.tokenizer
    state, cfg = _state(llama), llama.config.to_dict()
    ids = tok(PROMPT)["input_ids"]
    with torch.no_grad():
        before_logits = llama(torch.tensor([ids])).logits
    full = export_gguf(llama, tok, tmp_path / "full.gguf", out_type="f32")

    rec, scores = drop_layers(llama, blocks, 1, metric="angular", batch_size=2)
    assert len(rec.removed) == 1 and rec.removed[0] in (1, 2)  # first and last layers are protected
    assert llama.config.num_hidden_layers == 3 and len(decoder_layers(llama)) == 3
    assert _layer_idx(llama) == [[0], [1], [2]]
    assert not any(k.startswith("model.layers.3.") for k in llama.state_dict())
    kept = [i for i in range(4) if i not in rec.removed]
    for new_i, old_i in enumerate(kept):  # the kept layers' weights, renumbered
        assert torch.equal(llama.state_dict()[f"model.layers.{new_i}.mlp.down_proj.weight"],
                           state[f"model.layers.{old_i}.mlp.down_proj.weight"])
    assert set(rec.removed_tensors()) == {f"layers.{rec.removed[0]}.{k}" for k in rec.modules[0].state_dict()}
    with torch.no_grad():
        out = llama(torch.tensor([ids]), use_cache=True)  # the cache indexes layers by layer_idx
    assert torch.isfinite(out.logits).all() and not torch.equal(out.logits, before_logits)
    assert out.past_key_values.get_seq_length() == len(ids) and len(out.past_key_values.layers) == 3

    small = export_gguf(llama, tok, tmp_path / "drop1.gguf", out_type="f32")
    reader = gguf.GGUFReader(small.path)
    assert reader.fields["llama.block_count"].contents() == 3
    assert {int(t.name.split(".")[1]) for t in reader.tensors if t.name.startswith("blk.")} == {0, 1, 2}
    assert small.n_bytes < full.n_bytes
    if HAVE_LLAMA_CPP:
        _logits_match(llama, small.path, ids)

    revert_drop(llama, rec)
    assert _same_state(llama, state) and llama.config.to_dict() == cfg
    assert _layer_idx(llama) == [[0], [1], [2], [3]]
    with torch.no_grad():
        assert torch.equal(llama(torch.tensor([ids])).logits, before_logits)


def test_bad_inputs_refused_before_any_change(llama, blocks):
    state, cfg = _state(llama), llama.config.to_dict()
    cases = [([0, 1, 2, 3], "leave none"), ([1, 1], "duplicates"), ([4], "out of range"), ([-1], "out of range")]
    for drop, match in cases:
        with pytest.raises(BirdboneError, match=match):
            apply_drop(llama, drop)
    with pytest.raises(BirdboneError, match="first or last"):
        apply_drop(llama, [0], allow_ends=False)
    for n, match in [(-1, ">= 0"), (4, "leave none")]:
        with pytest.raises(BirdboneError, match=match):
            drop_layers(llama, blocks, n)
    with pytest.raises(BirdboneError, match="metric"):
        drop_layers(llama, blocks, 1, metric="loss")
    assert _same_state(llama, state) and llama.config.to_dict() == cfg
    llama.config.model_type = "gpt2"
    for call in (lambda: apply_drop(llama, [1]), lambda: layer_importance(llama, blocks)):
        with pytest.raises(BirdboneError, match="does not support model_type 'gpt2'"):
            call()
    assert _same_state(llama, state) and len(decoder_layers(llama)) == 4


def _tiny_gemma3(vocab: int) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gemma3_text", vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=7,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
        sliding_window=4, layer_types=G3_TYPES, query_pre_attn_scalar=24, rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 100000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() == 1 else 0.08))
    return model


def test_gemma3_keeps_layer_types_through_export(_tiny_loaded, tmp_path):
    from transformers import AutoModelForCausalLM

    tok = _tiny_loaded.tokenizer
    model = _tiny_gemma3(len(tok))
    state = _state(model)
    with pytest.raises(BirdboneError, match="global"):
        apply_drop(model, [5])  # the only global layer
    assert _same_state(model, state)

    rec = apply_drop(model, [1, 3])
    kept_types = [G3_TYPES[i] for i in (0, 2, 4, 5, 6)]
    assert model.config.layer_types == kept_types and model.config.num_hidden_layers == 5
    assert [a.self_attn.is_sliding for a in decoder_layers(model)] == [t == "sliding_attention" for t in kept_types]
    # the surgery is the same model as one built from scratch with the new config and the kept weights
    fresh = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32).eval()
    fresh.load_state_dict(model.state_dict())
    ids = tok(PROMPT)["input_ids"]
    assert len(ids) > 8  # longer than the sliding window of 4: the pattern matters
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([ids])).logits, fresh(torch.tensor([ids])).logits)

    res = export_gguf(model, tok, tmp_path / "g3.gguf", out_type="f32")
    f = gguf.GGUFReader(res.path).fields
    assert f["gemma3.block_count"].contents() == 5
    assert f["gemma3.attention.sliding_window_pattern"].contents() == [True, True, True, False, True]
    if HAVE_LLAMA_CPP:
        _logits_match(model, res.path, ids)
        # control: llama.cpp's fixed rule (il % 6 < 5 slides) would make all 5 kept layers sliding
        from birdbone_core.eval.llamacpp import llama_logits

        model.config.layer_types = ["sliding_attention"] * 5
        wrong = export_gguf(model, tok, tmp_path / "g3-rule.gguf", out_type="f32")
        model.config.layer_types = kept_types
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].numpy()
        assert np.abs(llama_logits(wrong.path, ids, n_threads=1) - ref).max() > 0.05 * np.abs(ref).max()

    revert_drop(model, rec)
    assert _same_state(model, state) and model.config.layer_types == G3_TYPES
    assert _layer_idx(model) == [[i] for i in range(7)]


@needs_llama_cpp
def test_llama_cpp_is_available():
    """The llama.cpp checks above run only with llama-cpp-python; make its absence visible as a skip."""
    assert HAVE_LLAMA_CPP
