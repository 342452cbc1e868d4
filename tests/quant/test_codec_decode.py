"""Decoders: bit-identical to gguf-py's dequantize for any bytes, and the API's checks."""
import warnings

import numpy as np
import pytest
import torch
from gguf import quants as gq

from birdbone_core.errors import BirdboneError
from birdbone_core.quant.codecs import codec_names, decode, encode, quantize_dequantize
from birdbone_core.quant.formats import get_format

NAMES = codec_names()


def gguf_dequant(packed: np.ndarray, name: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # inf * 0 in random blocks
        return gq.dequantize(packed, get_format(name).qtype)


def assert_bits_equal(a: np.ndarray, b: np.ndarray):
    """Same float32 bit patterns, except that any NaN matches any NaN."""
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    na, nb = np.isnan(a), np.isnan(b)
    np.testing.assert_array_equal(na, nb)
    np.testing.assert_array_equal(a.view(np.uint32)[~na], b.view(np.uint32)[~nb])


def test_every_format_has_a_codec():
    assert set(NAMES) == {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL"}


@pytest.mark.parametrize("name", NAMES)
def test_decode_random_bytes_matches_gguf(name):
    fmt = get_format(name)
    rng = np.random.default_rng(sum(map(ord, name)))
    blocks = rng.integers(0, 256, size=(2048, fmt.type_size), dtype=np.uint8)
    # whole blocks of one repeated byte: zero, subnormal, one-ish, max, inf and nan halves, sign bits
    for i, v in enumerate([0x00, 0x01, 0x3C, 0x7B, 0x7C, 0x7E, 0x80, 0xFC, 0xFF, 0x55, 0xAA]):
        blocks[i] = v
    packed = blocks.reshape(16, -1)  # 16 rows of 128 blocks
    shape = (16, 128 * fmt.block_size)
    out = decode(name, packed, shape)
    assert out.dtype == torch.float32 and tuple(out.shape) == shape
    assert_bits_equal(out.numpy(), gguf_dequant(packed, name))


@pytest.mark.parametrize("name", NAMES)
def test_decode_of_own_encoding_matches_gguf(name):
    W = torch.randn(8, 512) * torch.logspace(-3, 3, 8).view(8, 1)
    packed = encode(name, W)
    assert_bits_equal(decode(name, packed, W.shape).numpy(), gguf_dequant(packed, name))


def test_decode_accepts_torch_bytes_and_nd_shapes():
    W = torch.randn(2, 3, 64)
    packed = encode("Q8_0", W)
    assert packed.shape == (2, 3, 2 * get_format("Q8_0").type_size)
    a = decode("Q8_0", packed, W.shape)
    b = decode("Q8_0", torch.from_numpy(packed), (6, 64))
    assert torch.equal(a.reshape(6, 64), b)
    ro = packed.copy()
    ro.setflags(write=False)  # e.g. a memory-mapped GGUF tensor
    assert torch.equal(decode("Q8_0", ro, W.shape), a)


def test_decode_rejects_wrong_sizes():
    packed = encode("Q4_K", torch.randn(2, 256))
    with pytest.raises(BirdboneError, match="bytes"):
        decode("Q4_K", packed, (3, 256))
    with pytest.raises(BirdboneError, match="whole blocks"):
        decode("Q4_K", packed, (4, 128))
    with pytest.raises(BirdboneError, match="unknown"):
        decode("Q7_K", packed, (2, 256))


def test_encode_rejects_bad_input():
    with pytest.raises(BirdboneError, match="whole number of blocks"):
        encode("Q4_K", torch.randn(4, 640))
    with pytest.raises(BirdboneError, match="inf or nan"):
        encode("Q4_0", torch.full((1, 32), float("nan")))
    with pytest.raises(BirdboneError, match="importance has"):
        encode("Q4_0", torch.randn(2, 64), importance=torch.ones(32))
    with pytest.raises(BirdboneError, match="non-negative"):
        encode("Q4_0", torch.randn(2, 64), importance=-torch.ones(64))
    with pytest.raises(BirdboneError, match="no block codec"):
        encode("F16", torch.randn(2, 64))


def test_encode_leaves_torch_threads_alone():
    before = torch.get_num_threads()
    encode("Q4_K", torch.randn(4, 256))
    assert torch.get_num_threads() == before


def test_encode_takes_numpy_bf16_and_grad_tensors():
    W = torch.randn(4, 64, requires_grad=True)
    a = encode("Q5_1", W)
    assert a.dtype == np.uint8 and a.shape == (4, 2 * get_format("Q5_1").type_size)
    assert np.array_equal(a, encode("Q5_1", W.detach().numpy()))
    b16 = W.detach().bfloat16()
    assert np.array_equal(encode("Q5_1", b16), encode("Q5_1", b16.float()))


def test_quantize_dequantize_plain_and_block_formats():
    W = torch.randn(4, 256)
    assert torch.equal(quantize_dequantize("F32", W), W)
    assert torch.equal(quantize_dequantize("F16", W), W.half().float())
    assert torch.equal(quantize_dequantize("BF16", W), W.bfloat16().float())
    fq = quantize_dequantize("Q4_K", W)
    assert torch.equal(fq, decode("Q4_K", encode("Q4_K", W), W.shape))
