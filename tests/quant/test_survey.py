"""The quantizer's survey and shortlist (quant/survey.py): a sampled estimate stands for the whole
tensor, the shortlist keeps the sizes around the budget's pick, and on the fixture the shortlisted
search encodes far fewer candidates for (nearly) the exhaustive search's estimated error."""
import pytest
import torch

from birdbone_core.data.text import calibration_blocks, read_text
from birdbone_core.quant.calibration import collect_sensitivity
from birdbone_core.quant.codecs import decode, encode_torch
from birdbone_core.quant.config import Quantize
from birdbone_core.quant.engine import choose, measure_candidates
from birdbone_core.quant.error import estimated_loss
from birdbone_core.quant.survey import SURVEY_MIN_WEIGHTS, sample_rows, shortlist, survey_errors


def test_sample_rows_spread_and_small_tensors_whole():
    assert sample_rows(64, 256) is None  # 16k weights: below the minimum sample, surveyed whole
    idx = sample_rows(262144, 640)
    assert idx is not None and idx[0] == 0 and idx[-1] == 262143
    assert bool((idx[1:] > idx[:-1]).all())
    assert 262144 * 640 / 64 <= len(idx) * 640 <= 262144 * 640 / 64 + 2 * 640
    assert len(sample_rows(4096, 2048)) * 2048 >= SURVEY_MIN_WEIGHTS


def test_survey_of_a_small_tensor_is_the_exact_estimate():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 256, generator=g)
    X = torch.randn(512, 256, generator=g)
    H, F = X.T @ X / 512, torch.rand(16, generator=g)
    est = survey_errors(W, ["Q4_0", "Q4_K"], H, F, None, torch.diag(H))
    for t in ("Q4_0", "Q4_K"):
        pk, _ = encode_torch(t, W, torch.diag(H))
        assert est[t] == estimated_loss(decode(t, pk.numpy(), W.shape) - W, H, F, None)


def test_sampled_estimate_stands_for_the_whole_tensor():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(8192, 256, generator=g) * torch.linspace(0.5, 2, 8192).unsqueeze(1)  # rows differ in scale
    X = torch.randn(1024, 256, generator=g)
    H, F = X.T @ X / 1024, torch.rand(8192, generator=g) + 0.5
    ids = torch.arange(0, 8192, 7)
    lookups = (ids, torch.rand(len(ids), 256, generator=g))
    est = survey_errors(W, ["Q4_0", "Q2_K", "Q8_0"], H, F, lookups, None)
    for t in ("Q4_0", "Q2_K", "Q8_0"):
        pk, _ = encode_torch(t, W)
        full = estimated_loss(decode(t, pk.numpy(), W.shape) - W, H, F, lookups)
        assert abs(est[t] / full - 1) < 0.1, (t, est[t], full)
    assert est["Q2_K"] > est["Q4_0"] > est["Q8_0"]


def test_shortlist_keeps_the_sizes_around_the_pick():
    # one tensor, sizes 2..9 bytes; 5 and 6 are dominated (no better than 4); two types share size 4
    opts = {"a": {"T2": (2, 10.0), "T3": (3, 6.0), "T4": (4, 3.0), "T4b": (4, 3.5), "T4c": (4, 9.0),
                  "T5": (5, 3.0), "T6": (6, 4.0), "T8": (8, 1.0), "T9": (9, 0.5)}}
    assert shortlist(opts, 4, 1) == {"a": ["T3", "T4", "T4b", "T8"]}  # T4c: beyond the slack at its size
    assert shortlist(opts, 4, 0) == {"a": ["T4", "T4b"]}
    assert shortlist(opts, 4, 0, wide={"a"}) == {"a": ["T3", "T4", "T4b", "T8"]}
    assert shortlist(opts, 100, 1) == {"a": ["T8", "T9"]}
    assert shortlist(opts, 2, 1) == {"a": ["T2", "T3"]}


@pytest.fixture(scope="module")
def fixture_stats(_tiny_loaded):
    model, tok = _tiny_loaded.model.eval(), _tiny_loaded.tokenizer
    text, _ = read_text(None, "calib")
    return model, collect_sensitivity(model, calibration_blocks(tok, text, 8, 128, 0), batch_size=4)


@pytest.mark.parametrize("bpw", [3.5, 4.5, 6.0])
def test_shortlisted_search_matches_the_exhaustive_one(fixture_stats, bpw):
    model, sens = fixture_stats
    every = measure_candidates(model, Quantize(target_bpw=bpw, shortlist=None), sens)
    short = measure_candidates(model, Quantize(target_bpw=bpw, shortlist=1), sens)
    n_every = sum(len(o) for o in every.options.values())
    n_short = sum(len(o) for o in short.options.values())
    assert n_short < 0.6 * n_every, (n_short, n_every)
    budget = int(bpw * every.n_weights / 8)
    a, b = choose(every, budget), choose(short, budget)
    err = lambda c, q: sum(c.options[n][t][1] for n, t in q.types.items() if n in c.options)  # noqa: E731
    assert b.n_bytes <= budget
    assert err(short, b) <= 1.03 * err(every, a), (err(short, b), err(every, a))
    # every shortlisted candidate is the exhaustive search's candidate, byte for byte
    for n, opts in short.options.items():
        for t in opts:
            assert short.options[n][t] == every.options[n][t]
            assert (short.packed[n][t] == every.packed[n][t]).all()


def test_cache_reuses_encodings_across_budgets(fixture_stats):
    model, sens = fixture_stats
    cache: dict = {}
    first = measure_candidates(model, Quantize(target_bpw=4.5), sens, cache=cache)
    n = len(cache)
    again = measure_candidates(model, Quantize(target_bpw=4.5), sens, cache=cache)
    assert len(cache) == n and again.options == first.options
    measure_candidates(model, Quantize(target_bpw=8.0), sens, cache=cache)
    assert len(cache) > n
