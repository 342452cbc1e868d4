"""The simple 32-weight block formats: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.

Layouts (ggml-common.h): Q8_0 = d:f16, qs:int8[32]; Q4_0 = d, qs[16] (weight j in the low nibble of
byte j, weight j+16 in the high one); Q4_1 = d, m, qs[16]; Q5_0 = d, qh:u32 (bit j = 5th bit of
weight j), qs[16]; Q5_1 = d, m, qh, qs[16]. Values: Q8_0 d*q; Q4_0 d*(q-8); Q5_0 d*(q-16);
Q4_1/Q5_1 d*q + m.

Without importance the encoders are llama.cpp's reference quantizers (quantize_row_q*_ref) step by
step in float32, so their bytes equal `gguf.quants.quantize`'s. With importance they follow
llama.cpp's imatrix path (quantize_row_q*_impl: make_qx_quants for the symmetric types,
make_qkx3_quants for the affine ones, with weights qw*sqrt(sigma2 + x^2)), and then re-round every
weight to the nearest level of the half-precision scale actually stored, which can only lower each
weight's error. Q8_0 ignores importance, as llama.cpp does.
"""
from __future__ import annotations

import torch

from birdbone_core.quant.codecs._base import Codec, importance_weights, split_fields
from birdbone_core.quant.codecs._bits import (
    f16_bytes,
    f16_round,
    f16_value,
    nearest_int,
    pack_bits,
    pack_crumbs,
    round_away,
    signed_absmax,
    unpack_bits,
    unpack_crumbs,
)
from birdbone_core.quant.codecs._search import make_qkx_quants, make_qx_quants


def _inv(d: torch.Tensor) -> torch.Tensor:
    """C `d ? 1.0f/d : 0.0f`."""
    nz = d != 0
    return torch.where(nz, 1.0 / torch.where(nz, d, torch.ones_like(d)), torch.zeros_like(d))


def _row_sigma2(x: torch.Tensor) -> torch.Tensor:
    """Mean square of each row of x [R, nb, bs], shaped to broadcast against x."""
    n = x.shape[1] * x.shape[2]
    return ((x * x).sum(dim=(1, 2)) / n).view(-1, 1, 1)


def _requant(x, d, lo, hi, L, offset=None):
    """Nearest level in [lo, hi] of x (minus offset) on the grid d, where d is a usable scale."""
    ok = (d != 0) & torch.isfinite(d)
    dd = torch.where(ok, d, torch.ones_like(d)).unsqueeze(-1)
    v = x if offset is None else x - offset.unsqueeze(-1)
    return torch.where(ok.unsqueeze(-1), nearest_int(v / dd).clamp_(lo, hi), L)


class Q8_0(Codec):
    name = "Q8_0"
    top, levels_at = 255, (2, 34)          # q = int8 + 128

    def unpack_levels(self, f):
        return f.contiguous().view(torch.int8).to(torch.int16) + 128

    def pack_levels(self, q):
        return (q.to(torch.int16) - 128).to(torch.int8).view(torch.uint8)

    def encode(self, x, qw):
        d = x.abs().amax(-1) / 127
        q = round_away(x * _inv(d).unsqueeze(-1))
        return self._check_packed([f16_bytes(d), q.to(torch.int8).view(torch.uint8)])

    def decode(self, b):
        d, qs = split_fields(b, [2, self.block_size])
        return qs.contiguous().view(torch.int8).float() * f16_value(d).unsqueeze(-1)


class _Symmetric(Codec):
    """Q4_0 / Q5_0: x = d*(q - 2^(bits-1))."""

    bits: int

    def _levels(self, x, qw):
        half = 1 << (self.bits - 1)
        if qw is None:
            d = signed_absmax(x) / -half
            q = torch.trunc(x * _inv(d).unsqueeze(-1) + (half + 0.5)).clamp_(0, 2 * half - 1)
            return d, q
        w = importance_weights(x, qw, _row_sigma2(x))
        d, l = make_qx_quants(x.reshape(-1, self.block_size), half, w.reshape(-1, self.block_size))
        d, l = d.view(x.shape[:-1]), l.view(x.shape)
        l = _requant(x, f16_round(d), -half, half - 1, l)
        return d, l + half

    def _dequant(self, d, q):
        return d.unsqueeze(-1) * (q - (1 << (self.bits - 1)))


class _Affine(Codec):
    """Q4_1 / Q5_1: x = d*q + m."""

    bits: int

    def _levels(self, x, qw):
        nmax = (1 << self.bits) - 1
        if qw is None:
            mn, mx = x.amin(-1), x.amax(-1)
            d = (mx - mn) / nmax
            q = torch.trunc((x - mn.unsqueeze(-1)) * _inv(d).unsqueeze(-1) + 0.5).clamp_(0, nmax)
            return d, mn, q
        w = importance_weights(x, qw, _row_sigma2(x))
        d, the_min, l = make_qkx_quants(x.reshape(-1, self.block_size), w.reshape(-1, self.block_size),
                                        nmax, -0.9, 0.05, 36)
        d, m, l = d.view(x.shape[:-1]), (-the_min).view(x.shape[:-1]), l.view(x.shape)
        l = _requant(x, f16_round(d), 0, nmax, l, offset=f16_round(m))
        return d, m, l

    def _dequant(self, d, m, q):
        return d.unsqueeze(-1) * q + m.unsqueeze(-1)


def nibble_levels(f: torch.Tensor) -> torch.Tensor:
    """qs[16] -> 32 levels 0..15 (low nibbles are weights 0..15, high ones 16..31)."""
    return unpack_crumbs(f, 4)


def pack_nibble_levels(q: torch.Tensor) -> torch.Tensor:
    return pack_crumbs(q, 4)


def q5_levels(f: torch.Tensor) -> torch.Tensor:
    """qh[4] then qs[16] -> 32 levels 0..31 (the fifth bits, then the nibbles)."""
    return unpack_crumbs(f[..., 4:], 4) | (unpack_bits(f[..., :4]) << 4)


def pack_q5_levels(q: torch.Tensor) -> torch.Tensor:
    q = q.to(torch.uint8)
    return torch.cat([pack_bits(q >> 4), pack_crumbs(q & 15, 4)], -1)


# The four legacy 4/5-bit formats: scale bytes (d, or d and m), then the levels in the layout above.
class Q4_0(_Symmetric):
    name, bits = "Q4_0", 4
    top, levels_at = 15, (2, 18)
    unpack_levels, pack_levels = staticmethod(nibble_levels), staticmethod(pack_nibble_levels)

    def encode(self, x, qw):
        d, q = self._levels(x, qw)
        return self._check_packed([f16_bytes(d), self.pack_levels(q)])

    def decode(self, b):
        return self._dequant(f16_value(b[:, :2]), self.unpack_levels(b[:, 2:]).float())


class Q5_0(Q4_0):
    name, bits = "Q5_0", 5
    top, levels_at = 31, (2, 22)
    unpack_levels, pack_levels = staticmethod(q5_levels), staticmethod(pack_q5_levels)


class Q4_1(_Affine):
    name, bits = "Q4_1", 4
    top, levels_at = 15, (4, 20)
    unpack_levels, pack_levels = staticmethod(nibble_levels), staticmethod(pack_nibble_levels)

    def encode(self, x, qw):
        d, m, q = self._levels(x, qw)
        return self._check_packed([f16_bytes(d), f16_bytes(m), self.pack_levels(q)])

    def decode(self, b):
        return self._dequant(f16_value(b[:, :2]), f16_value(b[:, 2:4]), self.unpack_levels(b[:, 4:]).float())


class Q5_1(Q4_1):
    name, bits = "Q5_1", 5
    top, levels_at = 31, (4, 24)
    unpack_levels, pack_levels = staticmethod(q5_levels), staticmethod(pack_q5_levels)


CODECS = [Q8_0(), Q4_0(), Q4_1(), Q5_0(), Q5_1()]
