"""Magnitude pruning: drop the smallest |W|. The baseline every other method must beat."""
from __future__ import annotations

import torch

from birdbone_core.prune.masks import nm_mask, unstructured_mask


def magnitude_prune(
    W: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """W: [d_out, d_in]. Unstructured: one threshold for the whole matrix (layer-wise), as in the
    classic baseline; N:M: per group of m inputs. Returns (pruned W, keep mask)."""
    scores = W.abs()
    keep = nm_mask(scores, *nm) if nm else unstructured_mask(scores, sparsity, per_row=False)
    return W * keep, keep
