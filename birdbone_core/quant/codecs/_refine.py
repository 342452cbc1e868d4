"""A last local search over the stored sub-block scale levels of the K-quants.

llama.cpp rounds every sub-block scale (and min) to the nearest integer level of the super-block
step and stops there. Here, once the super-block steps are fixed as stored (half precision), each
sub-block also tries the neighbouring levels, re-rounds its weights, and keeps a neighbour only when
it lowers the target error (plain squared error, or importance-weighted under an imatrix) without
raising the error llama.cpp's search minimised (its own weights, squared or absolute). So the result
is never worse than the plain rounding by either measure. Errors are measured on exactly the values
the decoder will produce.

A sub-block whose level is the extreme one the super-block step was derived from (the largest scale at
-top for signed scales, top for unsigned ones) keeps it: the encoded block then stays in the form the
search itself produces, so encoding its decoded values finds the same step again (idempotence).
"""
from __future__ import annotations

import torch

from birdbone_core.quant.codecs._bits import nearest_int


def _err(diff: torch.Tensor, w: torch.Tensor | None, mad: bool = False) -> torch.Tensor:
    e = diff.abs() if mad else diff * diff
    return (e if w is None else w * e).sum(-1)


def refine_symmetric(x, d, ls, L, w_search, w_target, scale_range, level_range, deltas=(-2, -1, 1, 2)):
    """x [N, S, n]; d [N] stored step; ls [N, S] signed scale levels; L [N, S, n] signed weight levels
    (already the nearest for ls). Tries ls + delta (clamped to scale_range); returns (ls, L)."""
    lo_s, hi_s = scale_range
    lo, hi = level_range
    dsub = d.view(-1, 1) * ls
    e_t = _err(dsub.unsqueeze(-1) * L - x, w_target)
    e_s = _err(dsub.unsqueeze(-1) * L - x, w_search)
    base = ls
    frozen = base == lo_s
    span0 = torch.maximum(-L.amin(-1), L.amax(-1))
    for delta in deltas:
        cand = torch.where(frozen, base, (base + delta).clamp(lo_s, hi_s))
        dc = (d.view(-1, 1) * cand).unsqueeze(-1)
        ok = dc != 0
        Lc = torch.where(ok, nearest_int(x / torch.where(ok, dc, torch.ones_like(dc))).clamp_(lo, hi), L)
        y = dc * Lc - x
        ct, cs = _err(y, w_target), _err(y, w_search)
        # keep the sub-block's largest level within reach of the first search's candidates (the top
        # three levels), unless it was already below: re-encoding the decoded block then refits it exactly
        span = torch.maximum(-Lc.amin(-1), Lc.amax(-1))
        acc = (ct < e_t) & (cs <= e_s) & (span >= torch.minimum(span0, torch.full_like(span0, -lo - 3)))
        ls = torch.where(acc, cand, ls)
        L = torch.where(acc.unsqueeze(-1), Lc, L)
        e_t = torch.where(acc, ct, e_t)
        e_s = torch.where(acc, cs, e_s)
    return ls, L


def refine_affine(x, d, dmin, ls, lm, L, w_search, w_target, top, nmax, mad=False):
    """x [N, S, n]; d, dmin [N] stored steps; ls, lm [N, S] scale / min levels in [0, top]; L [N, S, n]
    weight levels in [0, nmax] (nearest for ls, lm). Tries ls +- 1 and lm +- 1; returns (ls, lm, L)."""
    d, dmin = d.view(-1, 1), dmin.view(-1, 1)

    def values(a, b, lv):
        return (d * a).unsqueeze(-1) * lv - (dmin * b).unsqueeze(-1)

    y = values(ls, lm, L) - x
    e_t, e_s = _err(y, w_target), _err(y, w_search, mad)
    span0 = L.amax(-1) - L.amin(-1)
    floor = torch.minimum(span0, torch.full_like(span0, nmax - 3))
    base_s, base_m = ls, lm
    for a in (-1, 0, 1):
        for b in (-1, 0, 1):
            if a == 0 and b == 0:
                continue
            cs_ = torch.where(base_s == top, base_s, (base_s + a).clamp(0, top))
            cm_ = torch.where(base_m == top, base_m, (base_m + b).clamp(0, top))
            dc = (d * cs_).unsqueeze(-1)
            mc = (dmin * cm_).unsqueeze(-1)
            ok = dc != 0
            Lc = torch.where(ok, nearest_int((x + mc) / torch.where(ok, dc, torch.ones_like(dc))).clamp_(0, nmax), L)
            y = dc * Lc - mc - x
            ct, cs = _err(y, w_target), _err(y, w_search, mad)
            acc = (ct < e_t) & (cs <= e_s) & (Lc.amax(-1) - Lc.amin(-1) >= floor)
            ls = torch.where(acc, cs_, ls)
            lm = torch.where(acc, cm_, lm)
            L = torch.where(acc.unsqueeze(-1), Lc, L)
            e_t = torch.where(acc, ct, e_t)
            e_s = torch.where(acc, cs, e_s)
    return ls, lm, L
