"""Width pruning (FFN neurons, GQA head groups) on the trained tiny Llama and tiny random qwen2/qwen3/gemma3:
shapes and config agree, llama.cpp runs the exported GGUF like torch, the record undoes the cut."""
from __future__ import annotations

import copy
import importlib.util

import gguf
import numpy as np
import pytest
import torch

from birdbone_core.data.text import calibration_blocks, read_text
from birdbone_core.errors import BirdboneError
from birdbone_core.export import export_gguf
from birdbone_core.model.layers import decoder_layers
from birdbone_core.structure.width import (
    apply_width,
    ffn_keep_count,
    head_rows,
    kv_keep_count,
    prune_width,
    restore_width,
    top_units,
)
from birdbone_core.structure.width_scores import Dims, model_dims

needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python is not installed")
PROMPT = "def area(r):\n    return 3.14159 * r ** 2  # circle, not a square"


@pytest.fixture(scope="module")
def calib(_tiny_loaded):
    return calibration_blocks(_tiny_loaded.tokenizer, read_text(None, "calib")[0], n_samples=8, seq_len=128, seed=0)


@pytest.fixture(scope="module")
def ids(_tiny_loaded):
    return _tiny_loaded.tokenizer(read_text(None, "eval")[0][:2000])["input_ids"][:64]


@pytest.fixture(scope="module")
def pruned(_tiny_loaded, calib):
    """(pruned copy, report): 30% of FFN neurons (512 -> 352), half the KV groups (4/2 heads -> 2/1)."""
    model = copy.deepcopy(_tiny_loaded.model)
    return model, prune_width(model, calib, ffn=0.3, heads=0.5)


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_pruned_shapes_and_config_agree(pruned, _tiny_loaded, ids):
    model, rep = pruned
    c = model.config
    assert (c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (352, 2, 1, 64)
    assert rep.record.original == {"intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
                                   "head_dim": 64}
    for layer in decoder_layers(model):
        a, m = layer.self_attn, layer.mlp
        assert a.q_proj.weight.shape == (128, 256) and a.o_proj.weight.shape == (256, 128)
        assert a.k_proj.weight.shape == a.v_proj.weight.shape == (64, 256)
        assert m.gate_proj.weight.shape == m.up_proj.weight.shape == (352, 256)
        assert m.down_proj.weight.shape == (256, 352) and m.down_proj.in_features == 352
    n_layer, hidden = 4, 256
    removed = n_layer * (3 * hidden * 160 + 6 * hidden * 64)  # 160 neurons x 3 matrices; 2 q, 1 k, 1 v, 2 o heads
    assert rep.params_before - rep.params_after == removed
    assert all(len(r) == 160 for r in rep.record.ffn_removed)
    assert all(len(r) == 1 for r in rep.record.kv_heads_removed)
    for kv, q in zip(rep.record.kv_heads_removed, rep.record.q_heads_removed):
        assert q == [2 * kv[0], 2 * kv[0] + 1]  # a KV head goes with both query heads that share it
    out = _logits(model, ids)
    assert out.shape == (len(ids), 1024) and torch.isfinite(out).all()
    # the cut keeps the model usable: next-token accuracy on text stays well above chance (1/1024)
    acc = (out[:-1].argmax(-1) == torch.tensor(ids[1:])).float().mean()
    ref = (_logits(_tiny_loaded.model, ids)[:-1].argmax(-1) == torch.tensor(ids[1:])).float().mean()
    assert acc > 0.3 * ref, (acc, ref)


def test_ratio_zero_changes_nothing(tiny, calib, ids):
    ref = _logits(tiny.model, ids)
    sd = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    rep = prune_width(tiny.model, calib, ffn=0.0, heads=0.0)
    assert rep.ffn_scores is None and rep.params_before == rep.params_after
    assert torch.equal(_logits(tiny.model, ids), ref)
    assert all(torch.equal(v, sd[k]) for k, v in tiny.model.state_dict().items())


def test_restore_rebuilds_the_original(_tiny_loaded, calib, ids):
    model = copy.deepcopy(_tiny_loaded.model)
    ref = _logits(model, ids)
    rep = prune_width(model, calib, ffn=0.5, heads=0.5)
    restore_width(model, rep.record)
    assert model.config.intermediate_size == 512 and model.config.num_key_value_heads == 2
    orig = _tiny_loaded.model.state_dict()
    assert all(torch.equal(v, orig[k]) for k, v in model.state_dict().items())
    assert torch.equal(_logits(model, ids), ref)
    with pytest.raises(BirdboneError, match="not the record"):
        restore_width(model, rep.record)  # already restored


def test_planning_picks_the_highest_scores():
    scores = torch.tensor([[0.1, 5.0, 3.0, 0.2, 4.0, 0.0],
                           [9.0, 0.1, 0.1, 8.0, 0.1, 7.0]])
    assert top_units(scores, 3).tolist() == [[1, 2, 4], [0, 3, 5]]
    assert top_units(torch.ones(1, 4), 2).tolist() == [[0, 1]]  # ties: lower index
    q_rows, kv_rows = head_rows(torch.tensor([1]), group=2, head_dim=3)
    assert q_rows.tolist() == [6, 7, 8, 9, 10, 11] and kv_rows.tolist() == [3, 4, 5]
    assert ffn_keep_count(512, 0.3) == 352 and ffn_keep_count(512, 0.3, 256) == 256
    assert kv_keep_count(Dims(4, 512, 8, 4, 64), 0.5) == 2


def test_scores_find_the_units_that_matter(tiny, calib):
    """Silence 3 neurons and KV head 1 in every layer (zero weights): the scores rank them last and the
    cut removes exactly them."""
    with torch.no_grad():
        for layer in decoder_layers(tiny.model):
            layer.mlp.down_proj.weight[:, [5, 100, 300]] = 0
            layer.self_attn.v_proj.weight[64:] = 0
    rep = prune_width(tiny.model, calib, ffn=1 / 16, heads=0.5)  # 512 -> 480: 32 neurons go
    assert (rep.ffn_scores[:, [5, 100, 300]] == 0).all() and (rep.group_scores[:, 1] == 0).all()
    assert all({5, 100, 300} <= set(r) for r in rep.record.ffn_removed)
    assert rep.record.kv_heads_removed == [[1]] * 4


@needs_llama_cpp
def test_gguf_runs_in_llama_cpp_and_is_smaller(pruned, _tiny_loaded, ids, tmp_path):
    from birdbone_core.eval.llamacpp import llama_logits

    model, _ = pruned
    tok = _tiny_loaded.tokenizer
    dense = export_gguf(_tiny_loaded.model, tok, tmp_path / "dense.gguf", out_type="f32")
    res = export_gguf(model, tok, tmp_path / "width.gguf", out_type="f32")
    f = gguf.GGUFReader(res.path).fields
    assert f["llama.feed_forward_length"].contents() == 352
    assert (f["llama.attention.head_count"].contents(), f["llama.attention.head_count_kv"].contents()) == (2, 1)
    assert res.notes == {}  # uniform widths: nothing zero-padded
    print(f"f32 GGUF: dense {dense.n_bytes} B, width-pruned {res.n_bytes} B ({res.n_bytes / dense.n_bytes:.3f})")
    assert res.n_bytes < 0.75 * dense.n_bytes
    ref = _logits(model, ids).numpy()
    got = llama_logits(res.path, ids)
    print(f"max |llama.cpp - torch| = {np.abs(got - ref).max():.2e}, |logits| max {np.abs(ref).max():.2f}")
    top2 = np.sort(ref, -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.05  # one position of this prompt is a near-tie (margin 4e-4)
    assert clear.mean() > 0.9 and (got.argmax(-1) == ref.argmax(-1))[clear].all()
    assert np.abs(got - ref).max() < 1e-3 * max(1.0, np.abs(ref).max()) * 10  # tests/export's F32 tolerance
    q8 = export_gguf(model, tok, tmp_path / "width-q8.gguf", out_type="q8_0")
    assert q8.fallbacks == {}  # 352 = 11 blocks of 32: ffn_down stays Q8_0


def _tiny(kind: str, vocab: int) -> torch.nn.Module:
    """Tiny random models of the other supported layouts (as tests/export/test_export_archs.py builds them)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=0, eos_token_id=1, pad_token_id=2)
    extra = {"qwen2": dict(tie_word_embeddings=True),
             "qwen3": dict(head_dim=32, tie_word_embeddings=False),
             "gemma3_text": dict(num_hidden_layers=3, head_dim=32, sliding_window=4, query_pre_attn_scalar=24,
                                 layer_types=["sliding_attention", "full_attention", "sliding_attention"])}[kind]
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **{**common, **extra}),
                                             dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(len(kind))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() == 1 else 0.08))
    return model


@needs_llama_cpp
@pytest.mark.parametrize("kind", ["qwen3", "gemma3_text", "qwen2"])
def test_other_layouts_match_llama_cpp(_tiny_loaded, kind, tmp_path):
    from birdbone_core.eval.llamacpp import llama_logits

    tok = _tiny_loaded.tokenizer
    model = _tiny(kind, len(tok))
    calib = torch.randint(3, len(tok), (2, 32), generator=torch.Generator().manual_seed(0))
    rep = prune_width(model, calib, ffn=0.5, heads=0.5 if kind != "qwen2" else 0.0)
    d = model_dims(model)
    assert (d.n_ff, d.n_head, d.n_kv) == ((64, 2, 1) if kind != "qwen2" else (64, 4, 2))
    if kind != "qwen2":
        assert model.model.layers[0].self_attn.q_norm.weight.shape == (32,)  # per head_dim: unchanged
    res = export_gguf(model, tok, tmp_path / f"{kind}.gguf", out_type="f32")
    ids = tok(PROMPT)["input_ids"]
    ref = _logits(model, ids).numpy()
    got = llama_logits(res.path, ids)
    assert np.abs(got - ref).max() < 5e-3 * np.abs(ref).max(), kind  # test_export_archs' F32 tolerance
    restore_width(model, rep.record)
    assert model_dims(model) == Dims(d.n_layer, 128, 4, 2, 32 if kind != "qwen2" else 16)


def test_bad_inputs_are_refused_before_any_change(tiny, calib):
    sd = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    cases = [
        (dict(ffn=0.99), "remove every one of the 512 FFN neurons"),
        (dict(ffn=0.01), "removes no FFN neuron"),
        (dict(ffn=1.0), r"must be in \[0, 1\)"),
        (dict(heads=-0.1), r"must be in \[0, 1\)"),
        (dict(heads=1.0), r"must be in \[0, 1\)"),
        (dict(heads=0.9), "remove every one of the 2 KV head groups"),
        (dict(heads=0.2), "removes no head"),
        (dict(ffn=0.3, heads=0.5, multiple=256), "attn_output rows of 128"),
        (dict(multiple=0), "positive"),
    ]
    for kwargs, message in cases:
        with pytest.raises(BirdboneError, match=message):
            prune_width(tiny.model, calib, **kwargs)
    assert all(torch.equal(v, sd[k]) for k, v in tiny.model.state_dict().items())
    with pytest.raises(BirdboneError, match="ascending"):
        apply_width(tiny.model, ffn_keep=torch.tensor([[3, 1]] * 4))


def test_unsupported_architectures_and_qwen2_heads_are_refused(_tiny_loaded, calib):
    qwen2 = _tiny("qwen2", 1024)
    with pytest.raises(BirdboneError, match="qwen2 attention heads cannot be pruned"):
        prune_width(qwen2, calib, heads=0.5)
    with pytest.raises(BirdboneError, match="hidden_size"):
        apply_width(qwen2, kv_keep=torch.tensor([[0]] * 2))
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(BirdboneError, match="does not support model_type 'gpt2'"):
        prune_width(gpt2, calib, ffn=0.5)


def test_calibrated_choice_beats_random_choice(_tiny_loaded, calib):
    """Measured (48 chunks of 128, 32 calibration blocks): dense ppl 30.36; FFN 512 -> 256 picked by score
    36.41, at random 58.7; KV groups 2 -> 1 by score 104.5, at random 325.3."""
    from birdbone_core.data.text import evaluation_chunks
    from birdbone_core.eval.perplexity import evaluate

    chunks = evaluation_chunks(_tiny_loaded.tokenizer, read_text(None, "eval")[0], n_ctx=128, max_chunks=8)
    scored, rand = copy.deepcopy(_tiny_loaded.model), copy.deepcopy(_tiny_loaded.model)
    prune_width(scored, calib, ffn=0.5)
    gen = torch.Generator().manual_seed(0)
    apply_width(rand, ffn_keep=torch.stack([torch.randperm(512, generator=gen)[:256].sort().values for _ in range(4)]))
    assert evaluate(scored, chunks)[0].ppl < 0.8 * evaluate(rand, chunks)[0].ppl


@needs_llama_cpp
@pytest.mark.parametrize("heads", [0.0, 0.375], ids=["ffn", "ffn+heads"])
def test_per_layer_widths_export_as_deci_and_round_trip(_tiny_loaded, calib, ids, tmp_path, heads):
    """One ranking over every layer's neurons (and KV groups: 5 of 8 kept, so the layers cannot all keep as
    many): layers keep different widths and head counts; the GGUF is llama.cpp's deci with per-layer
    feed_forward_length / head_count / head_count_kv and runs like torch; the HF directory reloads; the
    record undoes it bit for bit."""
    from birdbone_core.eval.llamacpp import llama_logits
    from birdbone_core.model.load import load_model
    from birdbone_core.model.save import save_hf

    model = copy.deepcopy(_tiny_loaded.model)
    rep = prune_width(model, calib, ffn=0.4, heads=heads, per_layer=True)
    widths = [layer.mlp.gate_proj.out_features for layer in decoder_layers(model)]
    assert len(set(widths)) > 1 and all(w % 32 == 0 for w in widths)
    assert abs(sum(widths) - 0.6 * 4 * 512) <= 4 * 16                     # 40% of all neurons, rounded per layer
    kv = [layer.self_attn.k_proj.out_features // 64 for layer in decoder_layers(model)]
    q = [layer.self_attn.q_proj.out_features // 64 for layer in decoder_layers(model)]
    assert q == [2 * k for k in kv]                                        # whole groups of 2 query heads
    assert kv == [2] * 4 if not heads else (sum(kv) == 5 and len(set(kv)) > 1)
    res = export_gguf(model, _tiny_loaded.tokenizer, tmp_path / "deci.gguf", out_type="f32")
    f = gguf.GGUFReader(res.path).fields
    assert f["general.architecture"].contents() == "deci" and f["deci.feed_forward_length"].contents() == widths
    if heads:
        assert f["deci.attention.head_count_kv"].contents() == kv and f["deci.attention.head_count"].contents() == q
    ref = _logits(model, ids).numpy()
    got = llama_logits(res.path, ids)
    assert np.abs(got - ref).max() < 2e-3 * np.abs(ref).max()
    save_hf(model, _tiny_loaded.tokenizer, tmp_path / "hf")
    again = load_model(str(tmp_path / "hf")).model
    assert torch.equal(_logits(again, ids), _logits(model, ids))
    restore_width(model, rep.record)
    for (k, a), b in zip(_tiny_loaded.model.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_per_layer_widths_are_refused_where_llama_cpp_cannot_run_them(_tiny_loaded, calib):
    model = _tiny("gemma3_text", len(_tiny_loaded.tokenizer))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(BirdboneError, match="deci"):
        prune_width(model, calib, ffn=0.3, per_layer=True)
    assert all(torch.equal(a, b) for a, b in zip(before.values(), model.state_dict().values()))
