"""IQ4_NL: 32-weight blocks on a fixed non-uniform grid of 16 values (4.5 bits per weight, like Q4_0).

Layout (ggml-common.h block_iq4_nl): d:f16, qs[16] (weight j in the low nibble of byte j, weight j+16 in
the high one, as Q4_0). Value: d * KVALUES[q], KVALUES = gguf-py's `IQ4_NL.kvalues` (ggml's
kvalues_iq4nl: denser near zero, where most weights are). Rows of 32-weight blocks fit Gemma's 640-wide
tensors, which cannot take K-quants.

Encoder: llama.cpp's quantize_iq4_nl (quantize_row_iq4_nl_impl with ntry = 7, what llama-quantize runs)
for one block: weights w = 1 (llama.cpp: x^2; with importance: qw * sqrt(sigma2 + x^2), sigma2 = 2 * mean(x^2) of the
block); the first scale is max / 127 (max: the weight of largest magnitude), then 15 inverse scales
(t - 127) / max, t = -7..7, are tried: each gives levels (nearest table values of x * id) and the
weighted least-squares scale d = sum(w q x) / sum(w q^2). Where llama.cpp keeps the candidate with the
largest sum(w q x)^2 / sum(w q^2) and rounds its scale afterwards, here each candidate's scale is rounded
to half precision first, its levels re-chosen at that scale, and the least weighted error wins; every
weight then holds the nearest table value at the stored scale.
"""
from __future__ import annotations

import torch
from gguf.quants import IQ4_NL as _GGUF_IQ4_NL

from birdbone_core.quant.codecs._base import Codec, importance_weights
from birdbone_core.quant.codecs._bits import f16_bytes, f16_round, f16_value, pack_crumbs, signed_absmax, unpack_crumbs
from birdbone_core.quant.codecs._search import GROUP_MAX_EPS

KVALUES = torch.tensor(_GGUF_IQ4_NL.kvalues, dtype=torch.float32)  # [16], ascending
_MIDPOINTS = (KVALUES[1:] + KVALUES[:-1]) / 2  # [15], all multiples of 1/2
# so "v >= midpoint" is "floor(2 v) >= 2 midpoint" (an integer test): a lookup over floor(2 v) gives the
# index exactly, several times faster than a binary search per element
_LUT_HALF = 512
_LUT = (torch.arange(-_LUT_HALF, _LUT_HALF + 1, dtype=torch.float32).unsqueeze(-1) >= 2 * _MIDPOINTS).sum(-1)
_VALUE_LUT = KVALUES[_LUT]
NTRY = 7  # llama.cpp's quantize_iq4_nl: scales tried at t = -7..7


def _key(v: torch.Tensor) -> torch.Tensor:
    return torch.floor(2 * v).clamp_(-_LUT_HALF, _LUT_HALF).add_(_LUT_HALF).long()


def nearest_index(v: torch.Tensor) -> torch.Tensor:
    """Index of the nearest KVALUES entry to each v (a tie goes to the larger value, as ggml's
    best_index_int8). The table moves to v's device (GPTQ's column loop may run on CUDA)."""
    return torch.take(_LUT.to(v.device), _key(v))


def nearest_value(v: torch.Tensor) -> torch.Tensor:
    """KVALUES[nearest_index(v)] in one lookup."""
    return torch.take(_VALUE_LUT.to(v.device), _key(v))


class IQ4_NL(Codec):
    name = "IQ4_NL"
    top, levels_at = 15, (2, 18)           # qs[16]: indices into KVALUES
    table = KVALUES
    chunk_weights = 1 << 14  # measured: 1.8x (640-wide rows) to 3-4x (2048-wide) faster than 1 << 18, same bytes

    def unpack_levels(self, f):
        return unpack_crumbs(f, 4)

    def pack_levels(self, q):
        return pack_crumbs(q, 4)

    def nearest_levels(self, v: torch.Tensor) -> torch.Tensor:
        """The index of the table value nearest each v."""
        return nearest_index(v)

    def _scale(self, x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
        """Block scales d [R, nb] for x [R, nb, 32]."""
        if qw is None:  # plain: the squared error itself (llama.cpp weighs by x^2 here)
            w = torch.ones_like(x)
        else:
            sigma2 = (x * x).sum(-1, keepdim=True) * (2.0 / x.shape[-1])
            w = importance_weights(x, qw, sigma2)
        mx = signed_absmax(x)
        zero = mx.abs() < GROUP_MAX_EPS
        mx = torch.where(zero, torch.ones_like(mx), mx)
        # candidate inverse scales [R, nb, 2 * NTRY + 2]: the first (max / 127), then (t - 127) / max
        tries = torch.arange(-NTRY, NTRY + 1, dtype=torch.float32)
        inv = torch.cat([(1 / (mx / -KVALUES[0])).unsqueeze(-1), (tries + KVALUES[0]) / mx.unsqueeze(-1)], -1)
        q = nearest_value(x.unsqueeze(-2) * inv.unsqueeze(-1))  # [R, nb, T, 32]
        wq = w.unsqueeze(-2) * q
        sumqx = (wq * x.unsqueeze(-2)).sum(-1)
        sumq2 = (wq * q).sum(-1)
        ok = sumq2 > 0
        d = torch.where(ok, sumqx / torch.where(ok, sumq2, torch.ones_like(sumq2)), torch.zeros_like(sumq2))
        # each candidate scale as it will be stored (half precision), its levels re-chosen at that scale,
        # scored by the weighted error itself: the least wins (llama.cpp scores the unrounded scale by
        # sum(w q x)^2 / sum(w q^2); this can only match or beat it on the error it stands for)
        d = f16_round(d)
        okd = d != 0
        q = nearest_value(x.unsqueeze(-2) / torch.where(okd, d, torch.ones_like(d)).unsqueeze(-1))
        err = (w.unsqueeze(-2) * (x.unsqueeze(-2) - d.unsqueeze(-1) * q) ** 2).sum(-1)
        err = torch.where(okd, err, (w * x * x).sum(-1, keepdim=True).expand_as(err))
        best = err.argmin(-1, keepdim=True)  # first on ties, as llama.cpp keeps an earlier candidate
        d = d.gather(-1, best).squeeze(-1)
        return torch.where(zero, torch.zeros_like(d), d)

    def encode(self, x, qw):
        d = self._scale(x, qw)  # already half-precision values
        ok = d != 0
        L = nearest_index(x / torch.where(ok, d, torch.ones_like(d)).unsqueeze(-1))
        L = torch.where(ok.unsqueeze(-1), L, torch.zeros_like(L))
        return self._check_packed([f16_bytes(d), self.pack_levels(L)])

    def decode(self, b):
        return f16_value(b[:, :2]).unsqueeze(-1) * KVALUES[self.unpack_levels(b[:, 2:]).long()]


CODECS = [IQ4_NL()]
