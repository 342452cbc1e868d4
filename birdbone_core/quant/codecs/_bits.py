"""Small tensor helpers shared by the codecs: half floats as bytes, bit packing, llama.cpp rounding.

Everything works on the last dimension and is vectorized over all leading ones. Bytes are
little-endian, as in GGUF files.
"""
from __future__ import annotations

import numpy as np
import torch

U8 = torch.uint8


def f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 [...] -> its IEEE half (round to nearest even, as ggml's FP32_TO_FP16) as bytes [..., 2]."""
    return x.to(torch.float16).unsqueeze(-1).contiguous().view(U8)


def f16_value(b: torch.Tensor) -> torch.Tensor:
    """bytes [..., 2] -> the half float they hold, widened exactly to float32 [...]."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def f16_round(x: torch.Tensor) -> torch.Tensor:
    """What a float32 becomes once stored as a half and read back."""
    return x.to(torch.float16).float()


def nearest_int(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's `nearest_int`: round half to even (the 1.5*2^23 trick), kept as float."""
    return torch.round(x)


def round_away(x: torch.Tensor) -> torch.Tensor:
    """C `roundf`: half away from zero, exact for every float (no `floor(x + 0.5)` double rounding)."""
    a = x.abs()
    fl = torch.floor(a)
    return torch.copysign(fl + (a - fl >= 0.5).to(x.dtype), x)


def f32(v: float) -> float:
    """A Python number rounded to float32, so constant arithmetic matches C `float` code."""
    return float(np.float32(v))


def f32_expr(a: float, b: float, c: float) -> float:
    """float32 evaluation of `a + b*c` step by step (two roundings, like C without FMA)."""
    return float(np.float32(a) + np.float32(b) * np.float32(c))


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """[..., 8*n] of 0/1 -> [..., n] bytes; element 8*k+b goes to bit b of byte k."""
    shape = bits.shape
    b = bits.to(U8).reshape(*shape[:-1], shape[-1] // 8, 8)
    shifts = torch.arange(8, dtype=U8, device=bits.device)
    return (b << shifts).sum(-1, dtype=torch.int32).to(U8)


def unpack_bits(b: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_bits`: [..., n] bytes -> [..., 8*n] of 0/1 (uint8)."""
    shifts = torch.arange(8, dtype=U8, device=b.device)
    return ((b.unsqueeze(-1) >> shifts) & 1).reshape(*b.shape[:-1], b.shape[-1] * 8)


def pack_crumbs(q: torch.Tensor, width: int) -> torch.Tensor:
    """Fields of `width` bits (8 % width == 0) laid in planes: q [..., k*G] with G = 8 // width
    groups of k -> bytes [..., k]; group g sits at bit g*width of every byte."""
    g = 8 // width
    shape = q.shape
    planes = q.to(U8).reshape(*shape[:-1], g, shape[-1] // g)
    shifts = (torch.arange(g, dtype=U8, device=q.device) * width).view(g, 1)
    return (planes << shifts).sum(-2, dtype=torch.int32).to(U8)


def unpack_crumbs(b: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of `pack_crumbs`: bytes [..., k] -> fields [..., G*k] (uint8)."""
    g = 8 // width
    shifts = (torch.arange(g, dtype=U8, device=b.device) * width).view(g, 1)
    mask = (1 << width) - 1
    return ((b.unsqueeze(-2) >> shifts) & mask).reshape(*b.shape[:-1], g * b.shape[-1])


def signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude along the last dim, sign kept; the first one on ties (as C's
    strict `>` scan)."""
    idx = x.abs().argmax(-1, keepdim=True)
    return x.gather(-1, idx).squeeze(-1)
