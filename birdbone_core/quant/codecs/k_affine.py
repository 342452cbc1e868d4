"""K-quants with a scale and a min per sub-block: Q2_K, Q4_K, Q5_K (super-blocks of 256 weights).

Layouts (ggml-common.h):
  Q2_K: scales[16] (low nibble: scale of sub-block j of 16 weights, high nibble: its min),
        qs[64] (2-bit levels; in each half of 128 weights, byte l holds weights l, l+32, l+64, l+96
        at bits 0, 2, 4, 6), d:f16, dmin:f16.              x = d*sc_j*q - dmin*m_j
  Q4_K: d, dmin, scales[12] (eight 6-bit scales and eight 6-bit mins, packed as get_scale_min_k4
        reads them), qs[128] (in each 64 weights, byte l holds weight l low, weight l+32 high).
  Q5_K: d, dmin, scales[12], qh[32] (bit j of byte l: 5th bit of weight 32*j + l), qs[128].
                                                           x = d*sc_j*q - dmin*m_j (sub-blocks of 32)

Encoding follows llama.cpp. Without importance (quantize_row_q*_K_ref): per sub-block
make_qkx2_quants with weights |x| (Q2_K, absolute error) or rms(x) + |x| (Q4_K/Q5_K), then the
sub-block scales and mins are rounded onto 4-/6-bit grids spanning their maxima. With importance
qw (quantize_row_q*_K_impl): weights qw*sqrt(sigma2 + x^2), make_qkx3_quants, and the sub-block
scales/mins quantized by make_qp_quants weighted by each sub-block's total weight. In both cases every
weight is finally re-rounded against the scale and min actually stored.
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
    unpack_crumbs,
)
from birdbone_core.quant.codecs._refine import refine_affine
from birdbone_core.quant.codecs._search import make_qkx_quants, make_qp_quants


def _grid_to_max(v: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference rounding of non-negative sub-block values v [N, S] onto 0..top with step max/top:
    returns (step [N], levels [N, S])."""
    vmax = v.amax(-1).clamp_min(0.0)
    pos = vmax > 0
    inv = torch.where(pos, top / torch.where(pos, vmax, torch.ones_like(vmax)), torch.zeros_like(vmax))
    levels = nearest_int(inv.unsqueeze(-1) * v).clamp_(0, top)
    return torch.where(pos, vmax / top, torch.zeros_like(vmax)), levels


class _AffineK(Codec):
    sub: int  # weights per sub-block
    nmax: int  # top level of a weight
    scale_top: int  # top level of a sub-block scale / min
    ref_search: tuple  # (rmin, rdelta, nstep, use_mad) of the reference path
    sigma_mult: float  # sigma2 = sigma_mult * mean(x^2) of the super-block (importance path)

    def _ref_weights(self, xs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _fit(self, x: torch.Tensor, qw: torch.Tensor | None):
        """x [R, nb, QK_K] -> (d [N], dmin [N], ls [N, S], lm [N, S], L [N, S, sub]) with N = R*nb."""
        n_sub = self.block_size // self.sub
        xs = x.reshape(x.shape[0], x.shape[1], n_sub, self.sub)
        if qw is None:
            w = self._ref_weights(xs)
            rmin, rdelta, nstep, mad = self.ref_search
        else:
            sigma2 = self.sigma_mult * (xs * xs).sum(dim=(2, 3), keepdim=True) / self.block_size
            w = importance_weights(xs, qw.reshape(1, qw.shape[0], n_sub, self.sub), sigma2)
            rmin, rdelta, nstep, mad = -0.9, 0.05, 36, False
        xs = xs.reshape(-1, n_sub, self.sub)
        w = w.reshape(-1, n_sub, self.sub)
        scales, mins, L = make_qkx_quants(xs.reshape(-1, self.sub), w.reshape(-1, self.sub),
                                          self.nmax, rmin, rdelta, nstep, use_mad=mad)
        scales, mins, L = scales.view(-1, n_sub), mins.view(-1, n_sub), L.view(xs.shape)
        if qw is None:
            d, ls = _grid_to_max(scales, self.scale_top)
            dmin, lm = _grid_to_max(mins, self.scale_top)
        else:
            sw = w.sum(-1)
            d, ls = make_qp_quants(scales, self.scale_top, sw)
            dmin, lm = make_qp_quants(mins, self.scale_top, sw)
        # re-round every weight against what is stored (kept, as in C, where a sub-block's scale is 0),
        # then let each sub-block try its neighbouring scale/min levels
        d16, dm16 = f16_round(d), f16_round(dmin)
        dsub = (d16.unsqueeze(-1) * ls).unsqueeze(-1)
        msub = (dm16.unsqueeze(-1) * lm).unsqueeze(-1)
        ok = dsub != 0
        Lr = nearest_int((xs + msub) / torch.where(ok, dsub, torch.ones_like(dsub))).clamp_(0, self.nmax)
        L = torch.where(ok, Lr, L)
        w_t = None if qw is None else qw.reshape(1, -1, n_sub, self.sub).expand(x.shape[0], -1, -1, -1).reshape(xs.shape)
        ls, lm, L = refine_affine(xs, d16, dm16, ls, lm, L, w, w_t, self.scale_top, self.nmax, mad=mad)
        return d, dmin, ls, lm, L


def _pack_scale_min_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins [N, 8] -> the 12 bytes read by get_scale_min_k4."""
    ls, lm = ls.to(torch.uint8), lm.to(torch.uint8)
    lo_s, hi_s = ls[:, :4], ls[:, 4:]
    lo_m, hi_m = lm[:, :4], lm[:, 4:]
    return torch.cat([lo_s | ((hi_s >> 4) << 6), lo_m | ((hi_m >> 4) << 6), (hi_s & 15) | ((hi_m & 15) << 4)], -1)


def _unpack_scale_min_k4(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d, m, md = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], -1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], -1)
    return sc, mn


class Q2_K(_AffineK):
    name = "Q2_K"
    top, levels_at = 3, (16, 80)           # qs[64]
    sub, nmax, scale_top = 16, 3, 15
    ref_search = (-0.5, 0.1, 15, True)
    sigma_mult = 1.0

    def unpack_levels(self, f):
        n = f.shape[0]
        return unpack_crumbs(f.reshape(n, -1, 32), 2).reshape(n, -1)

    def pack_levels(self, q):
        n = q.shape[0]
        return pack_crumbs(q.to(torch.uint8).reshape(n, -1, 128), 2).reshape(n, -1)

    def _ref_weights(self, xs):
        return xs.abs()

    def encode(self, x, qw):
        d, dmin, ls, lm, L = self._fit(x, qw)
        n = L.shape[0]
        scales = ls.to(torch.uint8) | (lm.to(torch.uint8) << 4)
        qs = pack_crumbs(L.reshape(n, -1, 128), 2).reshape(n, -1)
        out = self._check_packed([scales, qs, f16_bytes(d), f16_bytes(dmin)])
        return out.view(x.shape[0], x.shape[1], -1)

    def decode(self, b):
        n = b.shape[0]
        scales, qs, d, dmin = split_fields(b, [self.block_size // 16, self.block_size // 4, 2, 2])
        dl = f16_value(d).unsqueeze(-1) * (scales & 0xF).float()
        ml = f16_value(dmin).unsqueeze(-1) * (scales >> 4).float()
        q = unpack_crumbs(qs.reshape(n, -1, 32), 2).reshape(n, -1, 16).float()
        return (dl.unsqueeze(-1) * q - ml.unsqueeze(-1)).reshape(n, -1)


class _Q45K(_AffineK):
    sub, scale_top = 32, 63
    sigma_mult = 2.0

    def _ref_weights(self, xs):
        av_x = torch.sqrt((xs * xs).sum(-1, keepdim=True) / self.sub)
        return av_x + xs.abs()

    def encode(self, x, qw):
        d, dmin, ls, lm, L = self._fit(x, qw)
        n = L.shape[0]
        L = L.reshape(n, -1).to(torch.uint8)
        parts = [f16_bytes(d), f16_bytes(dmin), _pack_scale_min_k4(ls, lm)]
        if self.nmax > 15:
            parts.append(pack_crumbs(L >> 4, 1))
        parts.append(pack_crumbs((L & 15).reshape(n, -1, 64), 4).reshape(n, -1))
        return self._check_packed(parts).view(x.shape[0], x.shape[1], -1)

    def decode(self, b):
        n = b.shape[0]
        qh_bytes = self.block_size // 8 if self.nmax > 15 else 0
        d, dmin, scales, qh, qs = split_fields(b, [2, 2, 12, qh_bytes, self.block_size // 2])
        sc, mn = _unpack_scale_min_k4(scales)
        dl = f16_value(d).unsqueeze(-1) * sc.float()
        ml = f16_value(dmin).unsqueeze(-1) * mn.float()
        q = unpack_crumbs(qs.reshape(n, -1, 32), 4)
        if qh_bytes:
            q = q | (unpack_crumbs(qh, 1) << 4).reshape(q.shape)
        q = q.reshape(n, -1, self.sub).float()
        return (dl.unsqueeze(-1) * q - ml.unsqueeze(-1)).reshape(n, -1)


def q4k_levels(f: torch.Tensor) -> torch.Tensor:
    """qs[128] -> 256 levels 0..15."""
    n = f.shape[0]
    return unpack_crumbs(f.reshape(n, -1, 32), 4).reshape(n, -1)


def pack_q4k_levels(q: torch.Tensor) -> torch.Tensor:
    n = q.shape[0]
    return pack_crumbs(q.to(torch.uint8).reshape(n, -1, 64), 4).reshape(n, -1)


class Q4_K(_Q45K):
    name = "Q4_K"
    top, levels_at = 15, (16, 144)
    nmax = 15
    ref_search = (-1.0, 0.1, 20, False)

    def unpack_levels(self, f):
        return q4k_levels(f)

    def pack_levels(self, q):
        return pack_q4k_levels(q)


class Q5_K(_Q45K):
    name = "Q5_K"
    top, levels_at = 31, (16, 176)         # qh[32] then qs[128]
    nmax = 31
    ref_search = (-0.5, 0.1, 15, False)

    def unpack_levels(self, f):
        return q4k_levels(f[:, 32:]) | (unpack_crumbs(f[:, :32], 1) << 4)

    def pack_levels(self, q):
        q = q.to(torch.uint8)
        return torch.cat([pack_crumbs(q >> 4, 1), pack_q4k_levels(q & 15)], -1)


CODECS = [Q2_K(), Q4_K(), Q5_K()]
