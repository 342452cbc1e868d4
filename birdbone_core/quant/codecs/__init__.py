"""GGUF block codecs in torch: encode float matrices to llama.cpp's packed blocks and decode them back.

    encode(name, W, importance=None) -> np.ndarray[uint8]   [rows, cols // block_size * type_size]
    decode(name, packed, shape)      -> torch.Tensor float32 [*shape]
    quantize_dequantize(name, W, importance=None) -> torch.Tensor float32 (fake quantization)

Formats: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (`legacy`), Q2_K, Q4_K, Q5_K (`k_affine`), Q3_K, Q6_K
(`k_symmetric`); block geometry comes from `birdbone_core.quant.formats`. `W` is [rows, cols] (any
leading shape: rows are everything but the last dim) with cols a whole number of blocks; the packed
array has the byte shape `gguf.GGUFWriter.add_tensor(..., raw_dtype=qtype)` expects.

`importance` is an optional non-negative weight per column ([cols]), as a llama.cpp imatrix: with it
the encoders follow llama.cpp's imatrix quantizers (weighted scale search); without it, llama.cpp's
reference quantizers. Decoding is bit-identical to `gguf.quants.dequantize` (and to ggml's
`dequantize_row_*`) for any bytes.

Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 without importance write exactly llama.cpp's (and gguf-py's) bytes. The
K-quants run llama.cpp's searches and then a small local search over the stored sub-block scale
levels (`_refine`), so their error is at most llama.cpp's (tests check this against ggml itself) and
usually 1-25% lower; re-encoding decoded data is (near-)idempotent.
"""
from __future__ import annotations

import contextlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import torch

from birdbone_core.errors import BirdboneError
from birdbone_core.quant.codecs import k_affine, k_symmetric, legacy, nonlinear
from birdbone_core.quant.codecs._base import Codec
from birdbone_core.quant.formats import get_format

_CODECS: dict[str, Codec] = {c.name: c for c in (*legacy.CODECS, *k_affine.CODECS, *k_symmetric.CODECS, *nonlinear.CODECS)}
_PLAIN = {"F32": None, "F16": torch.float16, "BF16": torch.bfloat16}

# Weights encoded per step: large enough to amortize per-op overhead, small enough to stay in cache.
CHUNK_WEIGHTS = 1 << 18
# Torch intra-op threads used while coding. The ops are small (one chunk), so extra threads buy little,
# and on a shared, busy machine their spinning barriers made encoding ten times slower. None: leave
# torch's setting alone.
THREADS: int | None = 1
# Chunks coded side by side instead, each by its own thread with its ops inline (torch releases the GIL
# inside an op); chunks are independent, so the bytes are the same for any number.
WORKERS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
# Importance is floored at this fraction of its mean, so a span of all-zero importance (an unused
# column range) still gets a usable scale instead of llama.cpp's degenerate zero one.
IMPORTANCE_FLOOR = 1e-6


def codec_names() -> list[str]:
    """Names of the block formats this package encodes and decodes."""
    return list(_CODECS)


def get_codec(name) -> Codec:
    fmt = get_format(name)
    codec = _CODECS.get(fmt.name)
    if codec is None:
        raise BirdboneError(f"no block codec for {fmt.name}; codecs: {', '.join(_CODECS)}")
    return codec


@contextlib.contextmanager
def _threads() -> Iterator[None]:
    before = torch.get_num_threads()
    if THREADS is None or THREADS == before:
        yield
        return
    torch.set_num_threads(THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _as_matrix(W, block_size: int, fmt_name: str) -> torch.Tensor:
    t = torch.as_tensor(W).detach()
    if t.ndim == 0 or not (t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)):
        raise BirdboneError(f"{fmt_name}: expected a float matrix, got {tuple(t.shape)} {t.dtype}")
    t = t.to(torch.float32)
    cols = t.shape[-1]
    if cols == 0 or cols % block_size:
        raise BirdboneError(f"{fmt_name}: rows of {cols} weights are not a whole number of blocks of {block_size}")
    t = t.reshape(-1, cols)
    if not bool(torch.isfinite(t).all()):
        raise BirdboneError(f"{fmt_name}: the matrix holds inf or nan values")
    return t


def _as_importance(importance, cols: int, device, fmt_name: str) -> torch.Tensor | None:
    if importance is None:
        return None
    q = torch.as_tensor(importance).detach().to(device=device, dtype=torch.float32).reshape(-1)
    if q.numel() != cols:
        raise BirdboneError(f"{fmt_name}: importance has {q.numel()} values, the matrix has {cols} columns")
    if not bool(torch.isfinite(q).all()) or bool((q < 0).any()):
        raise BirdboneError(f"{fmt_name}: importance must be finite and non-negative")
    mean = float(q.mean())
    if mean <= 0:
        return None  # no information: plain reference quantization
    return q.clamp_min(mean * IMPORTANCE_FLOOR)


def encode_torch(name, W, importance=None) -> tuple[torch.Tensor, tuple[int, ...]]:
    codec = get_codec(name)
    shape = tuple(torch.as_tensor(W).shape)
    X = _as_matrix(W, codec.block_size, codec.name)
    rows, cols = X.shape
    nb = cols // codec.block_size
    qw = _as_importance(importance, cols, X.device, codec.name)
    qw = None if qw is None else qw.view(nb, codec.block_size)
    out = torch.empty((rows, nb * codec.type_size), dtype=torch.uint8, device=X.device)
    step = max(1, (codec.chunk_weights or CHUNK_WEIGHTS) // cols)

    def one(r0: int) -> None:
        chunk = X[r0:r0 + step].reshape(-1, nb, codec.block_size)
        out[r0:r0 + step] = codec.encode(chunk, qw).reshape(chunk.shape[0], -1)
    _each_chunk(range(0, rows, step), one)
    return out, shape


def _each_chunk(starts: range, fn) -> None:
    """fn(start) for every chunk, on WORKERS threads when there are several chunks (host tensors only)."""
    with _threads():
        if WORKERS == 1 or len(starts) < 2:
            with torch.inference_mode():
                for s in starts:
                    fn(s)
            return

        def run(s: int) -> None:
            with torch.inference_mode():         # per thread
                fn(s)
        with ThreadPoolExecutor(WORKERS) as pool:
            list(pool.map(run, starts))


def encode(name, W, importance=None) -> np.ndarray:
    """Quantize W ([..., cols], float) to `name` blocks: uint8 [..., cols // block_size * type_size]."""
    out, shape = encode_torch(name, W, importance)
    return out.cpu().numpy().reshape(*shape[:-1], out.shape[-1])


def decode(name, packed, shape: Sequence[int]) -> torch.Tensor:
    """Dequantize packed `name` blocks (any array of the right number of bytes) to float32 `shape`."""
    codec = get_codec(name)
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    if not shape or shape[-1] % codec.block_size:
        raise BirdboneError(f"{codec.name}: shape {shape} is not rows of whole blocks of {codec.block_size}")
    if isinstance(packed, np.ndarray):
        packed = np.ascontiguousarray(packed)
        if not packed.flags.writeable:  # e.g. a memory-mapped GGUF tensor: torch wants writable memory
            packed = packed.copy()
    b = torch.as_tensor(packed)
    if b.dtype != torch.uint8:
        b = b.contiguous().view(torch.uint8)
    b = b.reshape(-1)
    if b.numel() != codec.fmt.n_bytes(n):
        raise BirdboneError(f"{codec.name}: {b.numel()} bytes given, shape {shape} takes {codec.fmt.n_bytes(n)}")
    blocks = b.view(-1, codec.type_size)
    out = torch.empty((blocks.shape[0], codec.block_size), dtype=torch.float32, device=b.device)
    step = max(1, (CHUNK_WEIGHTS * 4) // codec.block_size)

    def one(i: int) -> None:
        out[i:i + step] = codec.decode(blocks[i:i + step])
    _each_chunk(range(0, blocks.shape[0], step), one)
    return out.view(shape)


def quantize_dequantize(name, W, importance=None) -> torch.Tensor:
    """What W becomes once stored as `name` and read back (float32, W's shape), for fake-quant
    evaluation. Also takes the plain float formats F32/F16/BF16."""
    fmt = get_format(name)
    if fmt.name in _PLAIN:
        t = torch.as_tensor(W).detach().to(torch.float32)
        dt = _PLAIN[fmt.name]
        return t.clone() if dt is None else t.to(dt).to(torch.float32)
    packed, shape = encode_torch(fmt.name, W, importance)
    return decode(fmt.name, packed, shape)


__all__ = ["CHUNK_WEIGHTS", "Codec", "codec_names", "decode", "encode", "get_codec", "quantize_dequantize"]
