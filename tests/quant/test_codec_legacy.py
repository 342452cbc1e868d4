"""Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 encoders: byte-identical to gguf-py (= llama.cpp's reference quantizers)."""
import warnings

import numpy as np
import pytest
import torch
from gguf import quants as gq

from birdbone_core.quant.codecs import decode, encode, quantize_dequantize
from birdbone_core.quant.formats import get_format

LEGACY = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


def gguf_quant(W: np.ndarray, name: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # overflow to inf in the huge-value cases
        return gq.quantize(W, get_format(name).qtype)


def hard_cases(rng) -> np.ndarray:
    """Rows of 64 (two blocks) meant to break sloppy rounding."""
    rows = [
        rng.standard_normal(64),
        np.zeros(64),  # all-zero blocks: d = 0, id = 0
        rng.standard_normal(64) * 1e-30,  # d underflows to a half subnormal / zero
        rng.standard_normal(64) * 1e-6,
        rng.standard_normal(64) * 1e8,  # d overflows the half range (inf), levels still from f32 d
        np.full(64, 3.0),  # constant blocks: max == min
        np.full(64, -3.0),
        np.tile([127.0, -127.0] + [0.5, 1.5, -2.5, 126.5, -0.5, 63.5] * 5, 2),  # +-amax tie, .5 ties
        np.tile([-8.0, 8.0, 4.0, -4.0, 0.5, 7.5, -7.5, 1.0] * 4, 2),  # exact grid points, halves
        np.tile([16.0, -16.0, 15.5, -15.5, 0.25, 31.0, 1.0, 2.0], 8),
        rng.integers(-3, 4, 64).astype(np.float64),  # few distinct values
        np.concatenate([rng.standard_normal(32), rng.standard_normal(32) * 1000]),
        np.where(rng.random(64) < 0.5, 0.0, rng.standard_normal(64)),  # sparse (pruned) rows
        -np.abs(rng.standard_normal(64)),  # one-signed blocks
        np.abs(rng.standard_normal(64)) + 5,
    ]
    return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("name", LEGACY)
def test_bytes_equal_gguf_on_random_data(name):
    rng = np.random.default_rng(7)
    W = (rng.standard_normal((64, 512)) * rng.lognormal(0, 2, (64, 1))).astype(np.float32)
    assert np.array_equal(encode(name, W), gguf_quant(W, name))


@pytest.mark.parametrize("name", LEGACY)
def test_bytes_equal_gguf_on_hard_cases(name):
    W = hard_cases(np.random.default_rng(3))
    assert np.array_equal(encode(name, W), gguf_quant(W, name))


@pytest.mark.parametrize("name", LEGACY)
def test_round_trip_is_idempotent(name):
    W = torch.randn(32, 256) * 3
    once = quantize_dequantize(name, W)
    assert torch.equal(quantize_dequantize(name, once), once)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_importance_lowers_weighted_error(name):
    g = torch.Generator().manual_seed(5)
    W = torch.randn(64, 512, generator=g)
    imp = torch.rand(512, generator=g) ** 4 * 100 + 0.01  # a few columns matter much more

    def werr(fq):
        return float(((fq - W) ** 2 * imp).sum())

    plain, weighted = werr(quantize_dequantize(name, W)), werr(quantize_dequantize(name, W, imp))
    assert weighted < 0.97 * plain, (plain, weighted)
    # and the stored bytes are a valid block of the format
    packed = encode(name, W, imp)
    assert torch.equal(decode(name, packed, W.shape), quantize_dequantize(name, W, imp))


def test_q8_0_ignores_importance_like_llama_cpp():
    W = torch.randn(4, 64)
    assert np.array_equal(encode("Q8_0", W, torch.rand(64)), encode("Q8_0", W))


@pytest.mark.parametrize("name", ["Q4_0", "Q5_1"])
def test_zero_importance_falls_back_and_zero_spans_stay_usable(name):
    W = torch.randn(8, 128)
    assert np.array_equal(encode(name, W, torch.zeros(128)), encode(name, W))
    imp = torch.ones(128)
    imp[:64] = 0  # columns nobody reads: floored, not a degenerate zero scale
    fq = quantize_dequantize(name, W, imp)
    assert float((fq[:, :64] - W[:, :64]).abs().max()) < float(W.abs().max())
