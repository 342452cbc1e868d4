"""K-quants with one signed scale per sub-block of 16: Q3_K and Q6_K (super-blocks of 256 weights).

Layouts (ggml-common.h):
  Q3_K: hmask[32] (bit j of byte l: high bit of weight 32*j + l, set meaning "no -4 offset"),
        qs[64] (low 2 bits; in each half of 128, byte l holds weights l, l+32, l+64, l+96),
        scales[12] (sixteen 6-bit scales, offset 32: low nibbles in bytes 0..7, weight j < 8 low,
        j >= 8 high nibble of byte j-8; top 2 bits of scale j at bits 2*(j/4) of byte 8 + j%4),
        d:f16.                                                x = d*(s_j - 32)*(q - 4)
  Q6_K: ql[128] (low 4 bits; in each half of 128, byte l < 64 holds weight l low, weight l+64 high),
        qh[64] (top 2 bits; in each half, byte l holds weights l, l+32, l+64, l+96),
        scales:int8[16], d:f16.                               x = d*s_j*(q - 32)

Encoding follows llama.cpp. Q3_K without importance (quantize_row_q3_K_ref): make_q3_quants per
sub-block (or make_qx_quants' fit with the same weights where that one is better), then the 16 scales rounded onto 6 signed bits spanning the largest; with importance
(quantize_row_q3_K_impl): make_qx_quants with weights qw*sqrt(sigma2 + x^2), then the scales
themselves quantized by make_qx_quants weighted by each sub-block's total weight. Q6_K: make_qx_quants
per sub-block (weights x^2, or the importance itself), scales rounded to int8 spanning the largest.
Every weight is finally re-rounded against the scale actually stored.
"""
from __future__ import annotations

import torch

from birdbone_core.quant.codecs._base import Codec, importance_weights, split_fields
from birdbone_core.quant.codecs._bits import (
    f16_bytes,
    f16_round,
    f16_value,
    nearest_int,
    pack_crumbs,
    signed_absmax,
    unpack_crumbs,
)
from birdbone_core.quant.codecs._refine import refine_symmetric
from birdbone_core.quant.codecs._search import GROUP_MAX_EPS, make_q3_quants, make_qx_quants

SUB = 16  # weights per sub-block (one scale each)


def _requant(xs, dsub, L, lo, hi):
    ok = dsub != 0
    Lr = nearest_int(xs / torch.where(ok, dsub, torch.ones_like(dsub))).clamp_(lo, hi)
    return torch.where(ok, Lr, L)


def _werr(x, w, scale, L):
    d = scale.unsqueeze(-1) * L - x
    return (w * d * d).sum(-1)


def _target(qw, shape, n_sub):
    """Per-weight target weights [N, n_sub, SUB] for the refinement: None (plain) or the importance."""
    if qw is None:
        return None
    return qw.reshape(1, shape[1], n_sub, SUB).expand(shape[0], -1, -1, -1).reshape(-1, n_sub, SUB)


def _signed_step(scales: torch.Tensor, top: float, lo: int, hi: int):
    """Round signed sub-block scales [N, S] onto integers in [lo, hi] with step -max/top, where max is
    the scale of largest magnitude (so it lands on -top). Returns (step [N], levels [N, S])."""
    mx = signed_absmax(scales)
    nz = mx != 0
    iscale = -top / torch.where(nz, mx, torch.ones_like(mx))
    levels = nearest_int(iscale.unsqueeze(-1) * scales).clamp_(lo, hi)
    step = torch.where(nz, 1.0 / iscale, torch.zeros_like(iscale))
    return step, torch.where(nz.unsqueeze(-1), levels, torch.zeros_like(levels)), nz


class Q3_K(Codec):
    name = "Q3_K"
    top, levels_at = 7, (0, 96)            # hmask[32] then qs[64]: low 2 bits + 4 * hmask bit

    def unpack_levels(self, f):
        n = f.shape[0]
        low = unpack_crumbs(f[:, 32:].reshape(n, -1, 32), 2).reshape(n, -1)
        return low | (unpack_crumbs(f[:, :32], 1) << 2)

    def pack_levels(self, q):
        q = q.to(torch.uint8)
        n = q.shape[0]
        return torch.cat([pack_crumbs(q >> 2, 1), pack_crumbs((q & 3).reshape(n, -1, 128), 2).reshape(n, -1)], -1)

    def encode(self, x, qw):
        R, nb = x.shape[0], x.shape[1]
        n_sub = self.block_size // SUB
        xs = x.reshape(R, nb, n_sub, SUB)
        if qw is None:
            xs = xs.reshape(-1, n_sub, SUB)
            w = xs * xs  # what make_q3_quants weighs by
            flat, wf = xs.reshape(-1, SUB), w.reshape(-1, SUB)
            scales, L = make_q3_quants(flat, 4)
            # where make_qx_quants' candidates fit a sub-block exactly (it already lies on a Q3_K grid,
            # as decoded GGUF data does), take that fit: make_q3_quants often misses it. Elsewhere its
            # x^2-weighted optimum would cost plain squared error, so llama.cpp's choice stays.
            s2, L2 = make_qx_quants(flat, 4, wf)
            e2 = _werr(flat, wf, s2, L2)
            better = (e2 < _werr(flat, wf, scales, L)) & (e2 <= 1e-10 * (wf * flat * flat).sum(-1))
            scales = torch.where(better, s2, scales).view(-1, n_sub)
            L = torch.where(better.unsqueeze(-1), L2, L).view(xs.shape)
            d, ls, nz = _signed_step(scales, 32.0, -32, 31)  # ls: signed level of each scale
            ls = torch.where(nz.unsqueeze(-1), ls, torch.full_like(ls, -32))  # C leaves the bytes zero
        else:
            sigma2 = 2 * (xs * xs).sum(dim=(2, 3), keepdim=True) / self.block_size
            w = importance_weights(xs, qw.reshape(1, nb, n_sub, SUB), sigma2).reshape(-1, n_sub, SUB)
            xs = xs.reshape(-1, n_sub, SUB)
            scales, L = make_qx_quants(xs.reshape(-1, SUB), 4, w.reshape(-1, SUB))
            scales, L = scales.view(-1, n_sub), L.view(xs.shape)
            d, ls = make_qx_quants(scales, 32, w.sum(-1))
        d16 = f16_round(d)
        L = _requant(xs, (d16.unsqueeze(-1) * ls).unsqueeze(-1), L, -4, 3)
        ls, L = refine_symmetric(xs, d16, ls, L, w, _target(qw, x.shape, n_sub), (-32, 31), (-4, 3))
        q = (L + 4).to(torch.uint8).reshape(xs.shape[0], -1)
        s = (ls + 32).to(torch.uint8)  # 0..63
        low = (s[:, :8] & 15) | ((s[:, 8:] & 15) << 4)
        high = pack_crumbs(s >> 4, 2)  # scale j's top bits at bits 2*(j//4) of byte j%4
        parts = [pack_crumbs(q >> 2, 1), pack_crumbs((q & 3).reshape(q.shape[0], -1, 128), 2).reshape(q.shape[0], -1),
                 low, high, f16_bytes(d)]
        return self._check_packed(parts).view(R, nb, -1)

    def decode(self, b):
        n = b.shape[0]
        hmask, qs, scales, d = split_fields(b, [self.block_size // 8, self.block_size // 4, 12, 2])
        s = torch.cat([scales[:, :8] & 15, scales[:, :8] >> 4], -1) | (unpack_crumbs(scales[:, 8:], 2) << 4)
        dl = f16_value(d).unsqueeze(-1) * (s.float() - 32)
        low = unpack_crumbs(qs.reshape(n, -1, 32), 2).reshape(n, -1)
        q = low.float() + 4 * unpack_crumbs(hmask, 1).float() - 4
        return (dl.unsqueeze(-1) * q.reshape(n, -1, SUB)).reshape(n, -1)


class Q6_K(Codec):
    name = "Q6_K"
    top, levels_at = 63, (0, 192)          # ql[128] then qh[64]

    def unpack_levels(self, f):
        n = f.shape[0]
        low = unpack_crumbs(f[:, :128].reshape(n, -1, 64), 4).reshape(n, -1)
        high = unpack_crumbs(f[:, 128:].reshape(n, -1, 32), 2).reshape(n, -1)
        return low | (high << 4)

    def pack_levels(self, q):
        q = q.to(torch.uint8).reshape(q.shape[0], -1, 128)
        n = q.shape[0]
        return torch.cat([pack_crumbs(q & 15, 4).reshape(n, -1), pack_crumbs(q >> 4, 2).reshape(n, -1)], -1)

    def encode(self, x, qw):
        R, nb = x.shape[0], x.shape[1]
        n_sub = self.block_size // SUB
        xs = x.reshape(R, nb, n_sub, SUB)
        w = xs * xs if qw is None else qw.reshape(1, nb, n_sub, SUB).expand_as(xs)
        xs = xs.reshape(-1, n_sub, SUB)
        scales, L = make_qx_quants(xs.reshape(-1, SUB), 32, w.reshape(-1, SUB), extra_exact_only=qw is None)
        scales, L = scales.view(-1, n_sub), L.view(xs.shape)
        d, ls, _ = _signed_step(scales, 128.0, -128, 127)
        zero = signed_absmax(scales).abs() < GROUP_MAX_EPS  # C writes an all-zero block
        d16 = f16_round(d)
        L = _requant(xs, (d16.unsqueeze(-1) * ls).unsqueeze(-1), L, -32, 31)
        ls, L = refine_symmetric(xs, d16, ls, L, w.reshape(xs.shape), _target(qw, x.shape, n_sub), (-128, 127), (-32, 31))
        q = (L + 32).to(torch.uint8)
        q = torch.where(zero.view(-1, 1, 1), torch.zeros_like(q), q).reshape(xs.shape[0], -1, 128)
        n = q.shape[0]
        parts = [pack_crumbs(q & 15, 4).reshape(n, -1), pack_crumbs(q >> 4, 2).reshape(n, -1),
                 torch.where(zero.unsqueeze(-1), torch.zeros_like(ls), ls).to(torch.int8).view(torch.uint8),
                 f16_bytes(torch.where(zero, torch.zeros_like(d), d))]
        return self._check_packed(parts).view(R, nb, -1)

    def decode(self, b):
        n = b.shape[0]
        ql, qh, scales, d = split_fields(b, [self.block_size // 2, self.block_size // 4, self.block_size // 16, 2])
        dl = f16_value(d).unsqueeze(-1) * scales.contiguous().view(torch.int8).float()
        low = unpack_crumbs(ql.reshape(n, -1, 64), 4)
        high = unpack_crumbs(qh.reshape(n, -1, 32), 2)
        q = (low | (high << 4)).float() - 32
        return (dl.unsqueeze(-1) * q.reshape(n, -1, SUB)).reshape(n, -1)


CODECS = [Q3_K(), Q6_K()]
