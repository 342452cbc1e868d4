"""Mask selection shared by the pruning kernels. Masks are bool tensors shaped like W: True = keep."""
from __future__ import annotations

import torch


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Drop the lowest-scoring `sparsity` fraction, per output row or over the whole matrix.

    scores: [d_out, d_in]. Exactly floor(sparsity * count) entries are dropped per comparison group.
    """
    keep = torch.ones_like(scores, dtype=torch.bool)
    if per_row:
        k = int(scores.shape[1] * sparsity)
        if k > 0:
            idx = torch.topk(scores, k, dim=1, largest=False).indices
            keep.scatter_(1, idx, False)
    else:
        k = int(scores.numel() * sparsity)
        if k > 0:
            idx = torch.topk(scores.flatten(), k, largest=False).indices
            keep.view(-1)[idx] = False
    return keep


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M sparsity: in every group of m consecutive inputs of a row, drop the n lowest scores.

    scores: [d_out, d_in] with d_in % m == 0.
    """
    d_out, d_in = scores.shape
    if d_in % m:
        raise ValueError(f"N:M pattern {n}:{m} needs the input width ({d_in}) to be a multiple of {m}")
    groups = scores.reshape(d_out, d_in // m, m)
    idx = torch.topk(groups, n, dim=2, largest=False).indices
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(2, idx, False)
    return keep.reshape(d_out, d_in)
