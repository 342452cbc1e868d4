"""SparseGPT (Frantar & Alistarh 2023): prune column by column and push each column's error onto the
columns not yet visited, using the inverse Hessian of the layer's reconstruction loss.

Notation of the paper: W [d_row, d_col] (out, in), H = 2 X X^T / n [d_col, d_col] from calibration
inputs X [d_col, n_tokens], Hinv its upper Cholesky factor of H^-1, B the lazy-update block size.
"""
from __future__ import annotations

import torch


def _inverse_hessian_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1; damping grows until H is positive definite."""
    d_col = H.shape[0]
    eye = torch.eye(d_col, dtype=H.dtype, device=H.device)
    damp = percdamp * torch.mean(torch.diag(H))
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U
        damp = damp * 10 if damp > 0 else 1e-6
    raise ValueError("Hessian is not positive definite even with heavy damping (too little calibration data?)")


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (pruned W with error compensation, keep mask). Works in float32 on W's device (H is moved
    there), returns W's dtype."""
    d_row, d_col = W.shape
    if H.shape != (d_col, d_col):
        raise ValueError(f"H shape {tuple(H.shape)} does not match W input width {d_col}")
    if nm and blocksize % nm[1]:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M={nm[1]}")
    out_dtype = W.dtype
    W = W.clone().float()
    H = H.to(device=W.device, dtype=torch.float32, copy=True)

    # inputs that never fired carry no information: zero their weights, make H invertible there
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    Hinv = _inverse_hessian_cholesky(H, percdamp)
    pruned = torch.zeros(d_row, d_col, dtype=torch.bool, device=W.device)

    for i1 in range(0, d_col, blocksize):
        i2 = min(i1 + blocksize, d_col)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()            # [d_row, B]
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]           # [B, B]

        if nm is None:
            # adaptive mask for the whole block: lowest w^2 / [Hinv]_cc^2 (the OBS saliency)
            saliency = W1**2 / torch.diag(Hinv1).reshape(1, -1) ** 2
            k = int(saliency.numel() * sparsity)
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            if k > 0:
                mask1.view(-1)[torch.topk(saliency.flatten(), k, largest=False).indices] = True
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)

        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                saliency = W1[:, i : i + m] ** 2 / torch.diag(Hinv1)[i : i + m].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(saliency, n, dim=1, largest=False).indices, True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1

        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])  # lazy batch update of the columns to the right

    keep = ~pruned
    return (W * keep).to(out_dtype), keep
