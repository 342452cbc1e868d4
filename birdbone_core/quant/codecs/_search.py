"""Scale (and min) searches for groups of weights, vectorized over groups.

Each function takes `x` [G, n] (G independent groups of n weights) and per-weight importance `w`
[G, n], and returns integer levels as float tensors plus the fitted scale (and min). They follow the
searches of llama.cpp's `ggml-quants.c` (`make_qx_quants`, `make_q3_quants`, `make_qkx2_quants` /
`make_qkx3_quants`, `make_qp_quants`): the same candidate grids, the same closed-form least-squares
fits and the same acceptance tests, evaluated in float32. Only the order of float additions inside
sums differs (torch reduces pairwise), so rare near-ties may resolve differently. Beyond llama.cpp,
make_qx_quants and make_qkx_quants also try a few candidates that land the group's extreme exactly
on an integer level; they only add choices to the same objective, and they let groups that already
lie on such a grid (decoded GGUF data) be refitted exactly.

The per-group loops of the C code become loops over a handful of candidate scales (or over the n
positions of a coordinate-descent sweep), each step a tensor operation over all groups at once.
"""
from __future__ import annotations

import torch

from birdbone_core.quant.codecs._bits import f32, f32_expr, nearest_int, signed_absmax

GROUP_MAX_EPS = 1e-15  # llama.cpp: a group whose largest |x| is below this is all zero
# The extra exact-span candidates (nmax - j levels) are tried down to this many levels.
EXTRA_MIN = 2


def _wsums(x: torch.Tensor, w: torch.Tensor, l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    wl = w * l
    return (wl * x).sum(-1), (wl * l).sum(-1)


def make_qx_quants(x: torch.Tensor, nmax: int, w: torch.Tensor,
                   extra_exact_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric levels l in [-nmax, nmax-1] with x ~ scale*l, minimising sum w (x - scale*l)^2 over
    candidate inverse scales -(nmax + 0.1*k)/max (k = -9..9, as llama.cpp; plus -(nmax - j)/max,
    j = 1..3), each refit by least squares. With `extra_exact_only` the extra candidates are taken only
    where they fit the group exactly (for weights, like x^2, whose optimum is not the squared error's).

    Returns (scale [G], l [G, n]). The value of largest magnitude maps to -nmax, so scale has the
    opposite sign of it. All-zero groups give scale 0 and l = -nmax (stored level 0)."""
    mx = signed_absmax(x)
    zero = mx.abs() < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)

    def trial(num: float):
        iscale = -num / mx
        l = nearest_int(iscale.unsqueeze(-1) * x).clamp_(-nmax, nmax - 1)
        return (l, *_wsums(x, w, l))

    best_l, sumlx, suml2 = trial(f32(nmax))
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    # llama.cpp's 18 candidates, plus up to three that put the largest weight exactly on level nmax-j: a
    # group that is already on a grid not spanning the full range (typically decoded GGUF data) is
    # then fitted exactly, which keeps re-encoding idempotent.
    base = [f32_expr(nmax, 0.1, k) for k in range(-9, 10) if k != 0]
    extra = [float(nmax - j) for j in (1, 2, 3) if nmax - j >= EXTRA_MIN]
    sumx2 = (w * x * x).sum(-1) if extra_exact_only else None
    for i, num in enumerate(base + extra):
        l, slx, sl2 = trial(num)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        if sumx2 is not None and i >= len(base):  # the fit's residual must vanish
            s = slx / sl2.clamp_min(torch.finfo(sl2.dtype).tiny)
            r = x - s.unsqueeze(-1) * l
            better &= (w * r * r).sum(-1) <= 1e-10 * sumx2
        best_l = torch.where(better.unsqueeze(-1), l, best_l)
        scale = torch.where(better, slx / sl2.clamp_min(torch.finfo(sl2.dtype).tiny), scale)
        best = torch.where(better, scale * slx, best)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    best_l = torch.where(zero.unsqueeze(-1), torch.full_like(best_l, -nmax), best_l)
    return scale, best_l


def _coordinate_descent(x, w, L, sumlx, suml2, lo: int, hi: int, need_sl2_pos: bool, passes: int = 5):
    """The levels refinement shared by make_q3_quants and make_qp_quants: for each position in turn,
    move its level to the one the other levels' least-squares scale asks for, if that raises
    sumlx^2/suml2 (i.e. lowers the weighted error at the optimal scale). Runs all passes; a pass with
    no change leaves the state as it was, so stopping early (as C does) gives the same result."""
    n = x.shape[-1]
    for _ in range(passes):
        for i in range(n):
            xi, wi, li = x[..., i], w[..., i], L[..., i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            ok = slx > 0
            if need_sl2_pos:
                ok &= sl2 > 0
            new_l = nearest_int(xi * sl2 / torch.where(ok, slx, torch.ones_like(slx))).clamp_(lo, hi)
            slx_n = slx + wi * xi * new_l
            sl2_n = sl2 + wi * new_l * new_l
            accept = ok & (new_l != li) & (sl2_n > 0) & (slx_n * slx_n * suml2 > sumlx * sumlx * sl2_n)
            L[..., i] = torch.where(accept, new_l, li)
            sumlx = torch.where(accept, slx_n, sumlx)
            suml2 = torch.where(accept, sl2_n, suml2)
    return L, sumlx, suml2


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q3_K's reference search: levels l in [-nmax, nmax-1] from iscale = -nmax/max, then up to five
    coordinate-descent sweeps with weights x^2. Returns (scale [G], l [G, n])."""
    mx = signed_absmax(x)
    zero = mx.abs() < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    w = x * x
    L = nearest_int((-f32(nmax) / mx).unsqueeze(-1) * x).clamp_(-nmax, nmax - 1)
    sumlx, suml2 = _wsums(x, w, L)
    L, sumlx, suml2 = _coordinate_descent(x, w, L, sumlx, suml2, -nmax, nmax - 1, need_sl2_pos=False)
    scale = torch.where(suml2 > 0, sumlx / suml2.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(sumlx))
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero.unsqueeze(-1), torch.full_like(L, -nmax), L)
    return scale, L


def make_qkx_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                    use_mad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Affine levels l in [0, nmax] with x ~ scale*l - the_min (the_min >= 0), as llama.cpp's
    make_qkx2_quants / make_qkx3_quants: start from the min-max grid, then try inverse scales
    (nmax + rmin + rdelta*k)/(max - min) for k = 0..nstep (and, beyond llama.cpp, (nmax - j)/(max - min)
    for j = 1..3), each refit (scale, min) by weighted least
    squares (min clamped to <= 0), keeping the candidate of lowest weighted squared (or absolute, with
    `use_mad`) error. Returns (scale [G], the_min [G], l [G, n])."""
    mn = x.amin(-1).clamp(max=0.0)
    mx = x.amax(-1)
    sum_w = w.sum(-1)
    sum_x = (w * x).sum(-1)
    flat = ~(mx > mn)
    rng = torch.where(flat, torch.ones_like(mx), mx - mn)

    def err_of(scale, m, l):
        d = scale.unsqueeze(-1) * l + m.unsqueeze(-1) - x
        return (w * (d.abs() if use_mad else d * d)).sum(-1)

    iscale = f32(nmax) / rng
    scale = 1.0 / iscale
    L = nearest_int(iscale.unsqueeze(-1) * (x - mn.unsqueeze(-1))).clamp_(0, nmax)
    best = err_of(scale, mn, L)
    cur_min = mn
    # C: rmin + rdelta*is + nmax, in float; then (extra) spans of exactly nmax-1..nmax-3 levels, which
    # refit groups already on such a grid (decoded GGUF data) exactly
    cands = [f32(f32_expr(rmin, rdelta, k) + f32(nmax)) for k in range(nstep + 1)] + [float(nmax - j) for j in (1, 2, 3) if nmax - j >= EXTRA_MIN]
    for num in cands:
        iscale = num / torch.where(flat, torch.ones_like(mx), mx - cur_min)
        v = iscale.unsqueeze(-1) * (x - cur_min.unsqueeze(-1))
        # C: v > 0 ? nearest_int(MIN(v, nmax)) : 0  (also turns inf/nan into a valid level)
        l = torch.where(v > 0, nearest_int(torch.minimum(v, torch.full_like(v, nmax))), torch.zeros_like(v))
        wl = w * l
        sum_l = wl.sum(-1)
        sum_l2 = (wl * l).sum(-1)
        sum_xl = (wl * x).sum(-1)
        D = sum_w * sum_l2 - sum_l * sum_l
        Ds = torch.where(D > 0, D, torch.ones_like(D))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, sum_xl / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)), this_scale)
        cur = err_of(this_scale, this_min, l)
        better = (D > 0) & (cur < best) & ~flat
        L = torch.where(better.unsqueeze(-1), l, L)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        cur_min = torch.where(better, this_min, cur_min)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    L = torch.where(flat.unsqueeze(-1), torch.zeros_like(L), L)
    return scale, -cur_min, L


def make_qp_quants(x: torch.Tensor, nmax: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative levels l in [0, nmax] with x ~ scale*l for non-negative x (the sub-block scales or
    mins of a super-block): best of 9 inverse scales (nmax + 0.1*k)/max (k = -4..4) by weighted error,
    then coordinate-descent sweeps. Returns (scale [G], l [G, n])."""
    mx = x.amax(-1)
    zero = mx < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)

    def mse(iscale, clamp):
        l = nearest_int(iscale.unsqueeze(-1) * x).clamp_(0, nmax if clamp else None)
        d = x - (1.0 / iscale).unsqueeze(-1) * l
        return (w * d * d).sum(-1)

    iscale = f32(nmax) / mx
    best = mse(iscale, clamp=False)
    for k in range(-4, 5):
        if k == 0:
            continue
        cand = f32_expr(nmax, 0.1, k) / mx
        e = mse(cand, clamp=True)
        better = e < best
        best = torch.where(better, e, best)
        iscale = torch.where(better, cand, iscale)
    L = nearest_int(iscale.unsqueeze(-1) * x).clamp_(0, nmax)
    sumlx, suml2 = _wsums(x, w, L)
    L, sumlx, suml2 = _coordinate_descent(x, w, L, sumlx, suml2, 0, nmax, need_sl2_pos=True)
    scale = torch.where(suml2 > 0, sumlx / suml2.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(sumlx))
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero.unsqueeze(-1), torch.zeros_like(L), L)
    return scale, L
