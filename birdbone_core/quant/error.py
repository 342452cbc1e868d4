"""The quantizer's error model: the estimated loss increase of a weight change, from calibration
statistics (`quant.engine.Sensitivity`). Pure function of tensors."""
from __future__ import annotations

import torch

from birdbone_core.quant.codecs import decode


def estimated_loss(dW: torch.Tensor, H: torch.Tensor | None, F: torch.Tensor | None,
                   emb_rows: tuple[torch.Tensor, torch.Tensor] | None) -> float:
    """Estimated loss increase (x2) of a weight change dW [rows, cols]: sum_r F_r (dW H dW^T)_rr, plus for an
    embedding sum_v sum_i G_vi dW_vi^2 over looked-up rows v (emb_rows = (v [m] row indices into dW,
    G [m, cols]), the diagonal Fisher of the lookup, the same diagonal approximation as F).
    H [cols, cols], F [rows]. Without statistics: plain squared error."""
    dW = dW.float()
    if H is None and emb_rows is None:
        return float((dW.double() ** 2).sum())
    total = 0.0
    if H is not None:  # float32 matmul (the 262k-row embedding), double sums
        per_row = ((dW @ H.float()) * dW).sum(1, dtype=torch.float64)
        total += float((per_row * (F.double() if F is not None else 1.0)).sum())
    if emb_rows is not None:
        ids, g2 = emb_rows
        d = dW[ids]
        total += float((d * d * g2).sum(dtype=torch.float64))
    return total


# rows scored at once by `encoded_loss`: bounds its float32 temporaries (decoded rows, dW, dW @ H)
LOSS_CHUNK_WEIGHTS = 1 << 22


def encoded_loss(qtype: str, packed, W: torch.Tensor, H: torch.Tensor | None, F: torch.Tensor | None,
                 emb_rows: tuple[torch.Tensor, torch.Tensor] | None) -> float:
    """`estimated_loss` of W [rows, cols] stored as `qtype` blocks `packed` [rows, row bytes], decoded and
    scored a chunk of rows at a time (the sum is over rows), so a 262k-row embedding never has its
    decoded copy and error matrices in memory whole."""
    rows, cols = W.shape
    packed = torch.as_tensor(packed).reshape(rows, -1)
    step = max(1, LOSS_CHUNK_WEIGHTS // cols)
    if emb_rows is not None:
        ids, g2 = emb_rows
        order = torch.argsort(ids)
        ids, g2 = ids[order], g2[order]
    total = 0.0
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        dW = decode(qtype, packed[r0:r1], (r1 - r0, cols)) - W[r0:r1]
        chunk_rows = None
        if emb_rows is not None:
            lo, hi = torch.searchsorted(ids, torch.tensor([r0, r1])).tolist()
            chunk_rows = (ids[lo:hi] - r0, g2[lo:hi])
        total += estimated_loss(dW, H, None if F is None else F[r0:r1], chunk_rows)
    return total
