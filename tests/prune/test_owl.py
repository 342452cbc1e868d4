"""OWL allocation: the kernel against hand-computed values, the map on the fixture usable by pruning."""
import re

import pytest
import torch
from pydantic import ValidationError

from birdbone_core.data.text import calibration_blocks, read_text
from birdbone_core.model.layers import decoder_layers, linear_modules
from birdbone_core.prune.owl import Owl, allocate, outlier_ratio, owl_layer_sparsity, owl_sparsities
from birdbone_core.prune.sequential import count_zeros, prune_sequential
from birdbone_core.recipe import parse_recipe


def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    # mean of [1]*9 + [91] is 10: only 91 > 5 * 10
    assert outlier_ratio([torch.ones(3, 3), torch.tensor([91.0])], 5.0) == pytest.approx(0.1)
    assert outlier_ratio([torch.ones(4, 4)], 5.0) == 0.0


def test_owl_sparsities_linear_map_without_clipping():
    got = owl_sparsities([1.0, 2.0, 3.0, 4.0], [1.0] * 4, target=0.5, lam=0.08)
    # d = lam * [-1, -1/3, 1/3, 1]; mean 0, so s = target - d
    assert got == pytest.approx([0.58, 0.5 + 0.08 / 3, 0.5 - 0.08 / 3, 0.42], abs=1e-12)


def test_owl_sparsities_clipped_and_weighted_hit_the_target_exactly():
    # one outlier-rich layer: d = [-lam, -lam, -lam, lam]; s = clip(t - d + c) with the last at t - lam
    # needs 3 (t + lam + c) + (t - lam) = 4 t  ->  c = -2 lam / 3
    got = owl_sparsities([0.0, 0.0, 0.0, 10.0], [1.0] * 4, target=0.5, lam=0.09)
    assert got == pytest.approx([0.53, 0.53, 0.53, 0.41], abs=1e-12)
    w = [1.0, 2.0, 3.0, 10.0]
    got = owl_sparsities([0.3, 0.1, 0.2, 0.9], w, target=0.4, lam=0.1)
    assert sum(a * b for a, b in zip(got, w)) / sum(w) == pytest.approx(0.4, abs=1e-12)
    assert all(0.3 - 1e-12 <= s <= 0.5 + 1e-12 for s in got)
    assert got[3] == min(got) and got[1] == max(got)  # most outliers -> least pruned
    assert owl_sparsities([0.2, 0.2], [1.0, 1.0], 0.5, 0.08) == [0.5, 0.5]
    with pytest.raises(ValueError):
        owl_sparsities([0.1], [1.0, 2.0], 0.5, 0.08)


def test_allocation_field_in_recipes():
    assert parse_recipe({}).prune.allocation == "uniform"
    assert parse_recipe({"prune": {"allocation": "owl"}}).prune.allocation == Owl()
    got = parse_recipe({"prune": {"allocation": {"method": "owl", "m": 7, "lam": 0.1}}}).prune.allocation
    assert (got.m, got.lam) == (7.0, 0.1)
    for bad in ("owls", {"method": "owl", "lamda": 0.1}, {"method": "owl", "lam": 0.6}):
        with pytest.raises(Exception, match="allocation"):
            parse_recipe({"prune": {"allocation": bad}})
    with pytest.raises(ValidationError):
        Owl(m=0)


@pytest.fixture(scope="module")
def calib(_tiny_loaded):
    return calibration_blocks(_tiny_loaded.tokenizer, read_text(None, "calib")[0], n_samples=8, seq_len=128,
                              seed=0)


def test_owl_layer_sparsity_on_the_fixture(tiny, calib):
    model = tiny.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = Owl(lam=0.1, batch_size=4)
    got = owl_layer_sparsity(model, calib, 0.5, cfg)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # model untouched
    layers = decoder_layers(model)
    assert list(got) == [rf"^model\.layers\.{i}\." for i in range(len(layers))]
    vals = list(got.values())
    sizes = [sum(m.weight.numel() for m in linear_modules(l).values()) for l in layers]
    assert sum(v * s for v, s in zip(vals, sizes)) / sum(sizes) == pytest.approx(0.5, abs=1e-9)
    assert all(0.4 - 1e-9 <= v <= 0.6 + 1e-9 for v in vals) and max(vals) - min(vals) > 0.05
    print("\nOWL sparsities on the fixture:", [round(v, 4) for v in vals])

    # the map drives pruning: each layer reaches its own sparsity, the whole model the target
    cfg_p = allocate(parse_recipe({"prune": {"method": "wanda", "sparsity": 0.5, "allocation": {
        "method": "owl", "lam": 0.1, "batch_size": 4}, "layer_sparsity": {r"layers\.0\.mlp": 0.3}}}).prune,
        model, calib)
    assert list(cfg_p.layer_sparsity)[0] == r"layers\.0\.mlp"      # the recipe's own entry still wins
    prune_sequential(model, calib, cfg_p)
    for pat, s in got.items():
        if pat.startswith(r"^model\.layers\.0"):
            continue
        zeros, total = count_zeros(model, pat)
        assert zeros / total == pytest.approx(s, abs=1 / 256), pat   # Wanda floors per row of >= 256
    zeros, total = count_zeros(model, r"layers\.0\.mlp")
    assert zeros / total == pytest.approx(0.3, abs=1 / 256)
    assert re.search(r"^model\.layers\.1\.", "model.layers.10.mlp.up_proj") is None
