"""Against llama.cpp itself: ggml's `ggml_quantize_chunk` from the libggml-base that llama-cpp-python
ships (the same code `llama-quantize` runs), called through ctypes."""
import ctypes
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import quants as gq

from birdbone_core.quant.codecs import codec_names, decode, encode
from birdbone_core.quant.formats import get_format

pytestmark = pytest.mark.llamacpp


@pytest.fixture(scope="module")
def ggml_quantize():
    llama_cpp = pytest.importorskip("llama_cpp")
    libs = sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.*"))
    if not libs:
        pytest.skip("llama-cpp-python ships no libggml-base")
    lib = ctypes.CDLL(str(libs[0]))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p]

    def quantize(W: np.ndarray, name: str, imatrix=None) -> np.ndarray:
        fmt = get_format(name)
        W = np.ascontiguousarray(W, dtype=np.float32)
        rows, cols = W.shape
        out = np.zeros((rows, fmt.n_bytes(cols)), np.uint8)
        im = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
        n = fn(int(fmt.qtype), W.ctypes.data, out.ctypes.data, 0, rows, cols, None if im is None else im.ctypes.data)
        assert n == out.nbytes
        return out

    return quantize


def data_sets():
    rng = np.random.default_rng(21)
    shape = (48, 1024)
    gauss = rng.standard_normal(shape)
    return {
        "gauss": gauss,
        "t3": rng.standard_t(3, size=shape),
        "outliers": gauss * np.where(rng.random(shape) < 0.01, 20, 1),
        "pruned": gauss * (rng.random(shape) < 0.5),
        "offset": gauss * 0.02 + 0.01,
    }


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_simple_types_bytes_equal_llama_cpp(name, ggml_quantize):
    for W in data_sets().values():
        W = W.astype(np.float32)
        assert np.array_equal(encode(name, W), ggml_quantize(W, name))


@pytest.mark.parametrize("name", codec_names())
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
def test_error_no_worse_than_llama_cpp(name, with_imatrix, ggml_quantize):
    """Squared error (weighted by the imatrix when there is one) at most llama.cpp's, on every data set;
    our decoder reads llama.cpp's bytes exactly as gguf-py does."""
    rng = np.random.default_rng(5)
    imatrix = (rng.gamma(0.5, size=1024) + 1e-3).astype(np.float32) if with_imatrix else None
    w = np.ones(1024, np.float32) if imatrix is None else imatrix
    for label, W in data_sets().items():
        W = W.astype(np.float32)
        theirs = ggml_quantize(W, name, imatrix)
        ref = decode(name, theirs, W.shape).numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert np.array_equal(ref, gq.dequantize(theirs, get_format(name).qtype))
        ours = decode(name, encode(name, W, imatrix), W.shape).numpy()
        e_ours = float((((ours - W) ** 2) * w).sum())
        e_ref = float((((ref - W) ** 2) * w).sum())
        assert e_ours <= e_ref * (1 + 1e-6), (name, label, e_ours / e_ref)


@pytest.mark.parametrize("name", codec_names())
def test_llama_cpp_dequantizes_our_blocks_as_we_do(name):
    """llama.cpp's own `dequantize_row_*` on our bytes (encoded with and without importance, and on
    random bytes) gives our decoder's values: the layouts agree."""
    llama_cpp = pytest.importorskip("llama_cpp")
    libs = sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.*"))
    if not libs:
        pytest.skip("llama-cpp-python ships no libggml-base")
    fn = getattr(ctypes.CDLL(str(libs[0])), f"dequantize_row_{name.lower().replace('_k', '_K')}")
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fmt = get_format(name)
    W = torch.randn(8, 1024, generator=torch.Generator().manual_seed(9)) * torch.logspace(-2, 2, 8).view(8, 1)
    rand = np.random.default_rng(1).integers(0, 256, size=(8, fmt.n_bytes(1024)), dtype=np.uint8)
    for packed in (encode(name, W), encode(name, W, torch.rand(1024) + 0.1), rand):
        packed = np.ascontiguousarray(packed)
        theirs = np.zeros(W.shape, np.float32)
        fn(packed.ctypes.data, theirs.ctypes.data, theirs.size)
        ours = decode(name, packed, W.shape).numpy()
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
        ok = ~np.isnan(ours)
        np.testing.assert_array_equal(ours[ok], theirs[ok])
