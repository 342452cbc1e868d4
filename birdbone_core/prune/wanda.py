"""Wanda (Sun et al. 2023): score each weight by |W_ij| * ||X_j||_2 and drop the lowest per output row.

No weight update; the input-activation norm makes a small weight on a loud channel worth keeping.
"""
from __future__ import annotations

import torch

from birdbone_core.prune.masks import nm_mask, unstructured_mask


def wanda_prune(
    W: torch.Tensor, act_norm: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """W: [d_out, d_in]; act_norm: [d_in] = ||X_j||_2 over calibration tokens.
    Returns (pruned W, keep mask). Comparison groups are output rows (per-output, as in the paper)."""
    if act_norm.shape != (W.shape[1],):
        raise ValueError(f"act_norm shape {tuple(act_norm.shape)} does not match W input width {W.shape[1]}")
    # scores on W's device, at least in float32 (bf16 weights on CUDA: their products would round into ties)
    Ws = W.float() if W.dtype in (torch.bfloat16, torch.float16) else W
    scores = Ws.abs() * act_norm.to(device=W.device, dtype=Ws.dtype).unsqueeze(0)
    keep = nm_mask(scores, *nm) if nm else unstructured_mask(scores, sparsity, per_row=True)
    return W * keep, keep
