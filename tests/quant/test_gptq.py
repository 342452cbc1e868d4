"""Grid-aware GPTQ: lower output error than rounding to the same formats, bytes that decode exactly."""
import numpy as np
import pytest
import torch
from gguf import quants as gq

from birdbone_core.errors import BirdboneError
from birdbone_core.quant.codecs import quantize_dequantize
from birdbone_core.quant.formats import get_format
from birdbone_core.quant.gptq import GPTQSettings, gptq_quantize, gptq_quantize_many, output_error

NAMES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL"]
SETTINGS = {"dynamic": GPTQSettings(), "static": GPTQSettings(static_scales=True),
            "act_order": GPTQSettings(act_order=True)}


def correlated_problem(rows=16, cols=512, seed=0):
    """Inputs with strongly correlated channels of unequal scale, as in transformer activations."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(2048, 48, generator=g)
    mix = torch.randn(48, cols, generator=g)
    X = latent @ mix + 0.3 * torch.randn(2048, cols, generator=g)
    X = X * torch.exp(torch.randn(cols, generator=g) * 0.5)
    H = X.T @ X / X.shape[0]
    W = torch.randn(rows, cols, generator=g) * 0.05
    return W, H


# every format with act-order (the default); dynamic and static grids on one format of each family
CASES = [(n, "act_order") for n in NAMES] + [(n, m) for n in ("Q4_0", "Q4_1", "Q4_K", "Q6_K", "IQ4_NL")
                                           for m in ("dynamic", "static")]


@pytest.mark.parametrize("name, mode", CASES)
def test_gptq_beats_rounding_and_decodes_exactly(name, mode):
    W, H = correlated_problem()
    r = gptq_quantize(W, H, name, SETTINGS[mode])
    # the bytes decode, by gguf-py (= ggml), to exactly the returned W_hat
    deq = gq.dequantize(r.packed, get_format(name).qtype)
    np.testing.assert_array_equal(deq.view(np.uint32), r.W_hat.numpy().view(np.uint32))
    assert r.packed.shape == (W.shape[0], get_format(name).n_bytes(W.shape[1]))
    # vs plain rounding to the same format (llama.cpp's reference quantizer, no importance) ...
    plain_ref = output_error(quantize_dequantize(name, W) - W, H)
    # ... and vs the importance-weighted rounding GPTQ's grids start from
    assert r.error == pytest.approx(output_error(r.W_hat - W, H))
    assert r.error < 0.8 * r.plain_error, (r.error, r.plain_error)
    assert r.error < 0.8 * plain_ref, (r.error, plain_ref)


def test_diagonal_hessian_gives_no_feedback():
    """With uncorrelated inputs there is nothing to compensate: GPTQ is rounding to its grid."""
    W = torch.randn(16, 256)
    H = torch.diag(torch.rand(256) + 0.5)
    r = gptq_quantize(W, H, "Q4_0", GPTQSettings(static_scales=True, damp=1e-9))
    assert r.error == pytest.approx(r.plain_error, rel=1e-6)


def test_row_chunks_do_not_change_the_result(monkeypatch):
    import birdbone_core.quant.gptq as g

    W, H = correlated_problem(rows=24, cols=256)
    whole = gptq_quantize(W, H, "Q4_K", GPTQSettings(act_order=True))
    monkeypatch.setattr(g, "ROW_CHUNK_WEIGHTS", 256 * 5)  # 5 rows per chunk
    chunked = gptq_quantize(W, H, "Q4_K", GPTQSettings(act_order=True))
    assert np.array_equal(whole.packed, chunked.packed)


def test_bad_inputs():
    W, H = correlated_problem(rows=4, cols=256)
    with pytest.raises(BirdboneError, match="not a block format"):
        gptq_quantize(W, H, "F16")
    with pytest.raises(BirdboneError, match="whole Q4_K blocks"):
        gptq_quantize(W[:, :96], H[:96, :96], "Q4_K")
    with pytest.raises(BirdboneError, match="Hessian must be"):
        gptq_quantize(W, H[:128, :128], "Q8_0")
    with pytest.raises(BirdboneError, match="expected a matrix"):
        gptq_quantize(W[0], H, "Q8_0")


@pytest.mark.parametrize("mode", ["act_order", "dynamic"])
def test_many_formats_in_one_pass_match_one_at_a_time(mode):
    """Stacking the formats' rows into one column pass solves the same per-row problems: the same error
    (up to float summation order, which may flip a rare tie) and bytes that decode exactly."""
    W, H = correlated_problem(rows=12, cols=512)
    many = gptq_quantize_many(W, H, NAMES, SETTINGS[mode])
    assert list(many) == NAMES
    for name in NAMES:
        one = gptq_quantize(W, H, name, SETTINGS[mode])
        r = many[name]
        deq = gq.dequantize(r.packed, get_format(name).qtype)
        np.testing.assert_array_equal(deq.view(np.uint32), r.W_hat.numpy().view(np.uint32))
        assert np.mean(r.packed != one.packed) < 1e-3, name
        assert r.error == pytest.approx(one.error, rel=1e-3), name
        assert r.plain_error == pytest.approx(one.plain_error, rel=1e-6), name


def test_many_formats_checks_every_format():
    W, H = correlated_problem(rows=4, cols=96)
    with pytest.raises(BirdboneError, match="whole Q4_K blocks"):
        gptq_quantize_many(W, H, ["Q4_0", "Q4_K"])
