"""The quantizer's error model: the estimated loss increase of a weight change, from calibration
statistics (`quant.engine.Sensitivity`). Pure function of tensors."""
from __future__ import annotations

import torch


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
