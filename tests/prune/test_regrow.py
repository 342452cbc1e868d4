"""Regrowth: swaps keep every zero count, touch only the swapped positions, and lower the error."""
import copy

import pytest
import torch
from pydantic import ValidationError

from birdbone_core.data.text import calibration_blocks, evaluation_chunks, read_text
from birdbone_core.eval.perplexity import evaluate
from birdbone_core.model.layers import decoder_layers, linear_modules
from birdbone_core.prune.regrow import Regrow, dsnot_mask, regrow_mask, regrow_model
from birdbone_core.prune.sequential import prune_sequential
from birdbone_core.recipe import parse_recipe


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _case(seed=0, shape=(8, 16), sparsity=0.5):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(*shape, generator=gen)
    keep = torch.rand(*shape, generator=gen) > sparsity
    return W * keep, keep, torch.rand(*shape, generator=gen)


def test_regrow_mask_swaps_best_revivals_for_weakest_survivors():
    W, keep, grad = _case()
    new = regrow_mask(W, keep, grad, None, n=5)
    revived, dropped = new & ~keep, keep & ~new
    assert int(revived.sum()) == int(dropped.sum()) == 5
    assert int((~new).sum()) == int((~keep).sum())
    # oracle: the 5 largest scores among pruned positions, the 5 smallest |W| among survivors
    want_rev = set(torch.topk(torch.where(~keep, grad, -1.0).flatten(), 5).indices.tolist())
    want_drop = set(torch.topk(torch.where(keep, W.abs(), 1e9).flatten(), 5, largest=False).indices.tolist())
    assert set(revived.flatten().nonzero().flatten().tolist()) == want_rev
    assert set(dropped.flatten().nonzero().flatten().tolist()) == want_drop
    assert torch.equal(new ^ keep, revived | dropped)  # nothing else moved
    assert torch.equal(regrow_mask(W, keep, grad, None, n=0), keep)


def test_regrow_mask_paired_swaps_only_profitable_pairs():
    keep = torch.tensor([[True, True, False, False]])
    W = torch.tensor([[1.0, 3.0, 0.0, 0.0]])
    grow = torch.tensor([[0.0, 0.0, 2.0, 0.5]])       # gains 2.0, 0.5; costs (|W|) 1.0, 3.0
    new = regrow_mask(W, keep, grow, None, n=2, paired=True)
    assert new.tolist() == [[False, True, True, False]]  # 2.0 > 1.0 swapped, 0.5 < 3.0 not


def test_regrow_mask_nm_keeps_every_group_at_n_zeros():
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(6, 16, generator=gen)
    groups = torch.rand(6, 4, 4, generator=gen).argsort(-1) < 2     # 2:4 -> 2 zeros per group
    keep = ~groups.reshape(6, 16)
    W = W * keep
    new = regrow_mask(W, keep, torch.rand(6, 16, generator=gen), None, n=7, nm=(2, 4))
    assert ((~new).reshape(6, 4, 4).sum(-1) == 2).all()
    changed = (new ^ keep).reshape(-1, 4).any(-1)
    assert int(changed.sum()) == 7                                  # one swap in each of 7 groups
    assert int((new ^ keep).sum()) == 14


def _local_error(W, Wd, X):
    return float(((Wd - W) @ X.T).pow(2).sum())


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_dsnot_mask_lowers_the_local_reconstruction_error(nm):
    gen = torch.Generator().manual_seed(2)
    Wd = torch.randn(16, 32, generator=gen, dtype=torch.float64)
    X = torch.randn(200, 32, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3, 32, dtype=torch.float64)
    if nm:
        keep = ~(torch.rand(16, 8, 4, generator=gen).argsort(-1) < 2).reshape(16, 32)
    else:
        keep = torch.rand(16, 32, generator=gen) > 0.5          # a poor (random) mask: room to improve
    W = Wd * keep
    new = dsnot_mask(W, Wd, keep, X.T @ X, n=40, nm=nm)
    revived, dropped = new & ~keep, keep & ~new
    assert 0 < int(revived.sum()) == int(dropped.sum()) <= 40
    if nm:
        assert ((~new).reshape(16, 8, 4).sum(-1) == 2).all()
    W_new = torch.where(revived, Wd, W) * new
    assert _local_error(W_new, Wd, X) < 0.95 * _local_error(W, Wd, X)


def test_regrow_config_is_strict():
    assert Regrow().fraction == 0.05 and Regrow().method == "rigl"
    with pytest.raises(ValidationError):
        Regrow(fraction=0.3)
    with pytest.raises(ValidationError):
        Regrow(method="random")
    with pytest.raises(ValidationError):
        Regrow(fractoin=0.1)
    r = parse_recipe({"waves": {"regrow": {"method": "dsnot", "fraction": 0.1}}})
    assert r.waves.regrow == Regrow(method="dsnot", fraction=0.1)
    assert parse_recipe({"waves": {}}).waves.regrow is None


@pytest.fixture(scope="module")
def setting(_tiny_loaded):
    tok = _tiny_loaded.tokenizer
    calib = calibration_blocks(tok, read_text(None, "calib")[0], n_samples=16, seq_len=128, seed=0)
    chunks = evaluation_chunks(tok, read_text(None, "eval")[0], n_ctx=128, max_chunks=16)
    dense = _tiny_loaded.model
    _, dense_hidden = evaluate(dense, chunks)
    pruned = copy.deepcopy(dense)
    prune_sequential(pruned, calib, parse_recipe({"prune": {"method": "magnitude", "sparsity": 0.5}}).prune)
    return dense, pruned, calib, chunks, dense_hidden


def _weights(model):
    return {f"{i}.{n}": m.weight.detach().clone()
            for i, layer in enumerate(decoder_layers(model)) for n, m in linear_modules(layer).items()}


@pytest.mark.parametrize("method", ["rigl", "dsnot"])
def test_regrow_model_swaps_only_and_beats_not_regrowing(setting, method):
    dense, pruned, calib, chunks, dense_hidden = setting
    model = copy.deepcopy(pruned)
    rep = regrow_model(model, dense, calib, Regrow(method=method, fraction=0.05, revert_if_worse=False,
                                                   batch_size=4))
    before, after, dw = _weights(pruned), _weights(model), _weights(dense)
    total = 0
    for name, w0 in before.items():
        w1 = after[name]
        keep0, keep1 = w0 != 0, w1 != 0
        assert int((~keep0).sum()) == int((~keep1).sum()), name          # zero count unchanged
        revived, dropped = keep1 & ~keep0, keep0 & ~keep1
        assert int(revived.sum()) == int(dropped.sum())
        assert int(revived.sum()) <= int(0.05 * int((~keep0).sum()))
        assert torch.equal(w1[revived], dw[name][revived])              # revived at the dense values
        same = ~(revived | dropped)
        assert torch.equal(w1[same], w0[same])                          # nothing else touched
        total += int(revived.sum())
    assert total == rep["swapped"] > 0
    assert sum(m["swapped"] for m in rep["modules"].values()) == total
    # every layer's reconstruction error vs the dense layer fell, and so did held-out KL / perplexity
    assert all(l["rel_error_after"] < l["rel_error_before"] for l in rep["layers"]), rep["layers"]
    base = evaluate(pruned, chunks, dense_hidden)[0]
    got = evaluate(model, chunks, dense_hidden)[0]
    print(f"\n{method}: magnitude-50% ppl {base.ppl:.3f} KL {base.kld:.4f} -> regrown ppl {got.ppl:.3f} "
          f"KL {got.kld:.4f} ({total} swaps)")
    assert got.kld < base.kld and got.ppl < base.ppl


def test_regrow_model_reverts_a_layer_it_made_worse(setting, monkeypatch):
    dense, pruned, calib, _, _ = setting
    import birdbone_core.prune.regrow as regrow

    def strongest_out(W, keep, grow, keep_score, n, nm=None, paired=False):  # drops the largest |W|
        return regrow_mask(W, keep, grow, -W.abs(), n, nm, paired)

    monkeypatch.setattr(regrow, "regrow_mask", strongest_out)
    model = copy.deepcopy(pruned)
    rep = regrow_model(model, dense, calib, Regrow(method="rigl", batch_size=4))
    assert all(l["reverted"] and l["swapped"] == 0 for l in rep["layers"]), rep["layers"]
    assert rep["swapped"] == 0
    before, after = _weights(pruned), _weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_regrow_model_keeps_an_nm_pattern(setting, _tiny_loaded):
    dense, _, calib, _, _ = setting
    model = copy.deepcopy(dense)
    prune_sequential(model, calib, parse_recipe({"prune": {"method": "magnitude", "pattern": "2:4"}}).prune)
    before = _weights(model)
    rep = regrow_model(model, dense, calib, Regrow(method="dsnot", batch_size=4), nm=(2, 4))
    assert rep["swapped"] > 0
    flips = 0
    for name, w in _weights(model).items():
        assert ((w == 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all(), name     # still 2:4 everywhere
        flips += int(((w != 0) ^ (before[name] != 0)).sum())
    assert flips == 2 * rep["swapped"]


def test_regrow_model_with_healing_steps_keeps_the_new_mask(setting):
    dense, pruned, calib, _, _ = setting
    model = copy.deepcopy(pruned)
    rep = regrow_model(model, dense, calib, Regrow(method="rigl", steps=5, lr=1e-3, batch_size=4,
                                                   revert_if_worse=False))
    swapped = copy.deepcopy(pruned)
    regrow_model(swapped, dense, calib, Regrow(method="rigl", batch_size=4, revert_if_worse=False))
    w_swapped, w_pruned = _weights(swapped), _weights(pruned)
    for name, w in _weights(model).items():
        assert int((w == 0).sum()) == int((w_pruned[name] == 0).sum()), name
        if name.startswith("0."):   # same inputs as without healing: same swaps, and healing kept them
            assert torch.equal(w != 0, w_swapped[name] != 0), name
    assert all(l["rel_error_after"] < l["rel_error_before"] for l in rep["layers"])
