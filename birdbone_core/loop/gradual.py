"""Gradual rollback, the kernel: which weights come back at each stage. Pure functions of tensors.

A rollback goes from the rejected state R (the ledger's last wave) back toward the last accepted state A.
The *restorable* positions of a tensor are those the rejected waves zeroed: R == 0 and A != 0. They are
ranked most important first and cut into `stages` equal parts (sizes differ by at most one, the earlier
parts larger); stage s restores the first s parts to A's values and leaves everything else as in R.
The last stage is A itself, bit for bit: every position restored and every other changed value (healed
survivors, regrown weights) undone too, so a gradual rollback never ends worse than a plain one.

Importance is the accepted state's |w|, times the input channel's activation norm when the caller has
one (`in_norm`, Wanda's score); ties go to the lower flat index, so the order is deterministic.
"""
from __future__ import annotations

import torch
from torch import Tensor


def restorable(current: Tensor, accepted: Tensor) -> Tensor:
    """Bool mask (shape of the tensors): zero in `current`, non-zero in `accepted` (-0.0 counts as zero)."""
    if current.shape != accepted.shape:
        raise ValueError(f"shapes differ: {tuple(current.shape)} vs {tuple(accepted.shape)}")
    return (current == 0) & (accepted != 0)


def restore_order(current: Tensor, accepted: Tensor, in_norm: Tensor | None = None) -> Tensor:
    """Flat indices (int64 [n_restorable]) of the restorable positions, most important first.

    current, accepted: [out, in] (any shape without in_norm); in_norm: [in], the input channel's norm."""
    idx = restorable(current, accepted).reshape(-1).nonzero().squeeze(1)           # ascending flat indices
    score = accepted.detach().abs().float()
    if in_norm is not None:
        if accepted.dim() != 2 or in_norm.shape != (accepted.shape[1],):
            raise ValueError(f"in_norm {tuple(in_norm.shape)} does not match the input channels of "
                             f"{tuple(accepted.shape)}")
        score = score * in_norm.detach().float().abs()[None, :]
    s = score.reshape(-1)[idx]
    # a NaN score (a NaN accepted weight) would sort unpredictably: rank it last
    s = torch.where(torch.isnan(s), torch.full_like(s, -1.0), s)
    perm = torch.sort(s, descending=True, stable=True).indices                    # stable: lower index first
    return idx[perm]


def stage_masks(current: Tensor, accepted: Tensor, stages: int, in_norm: Tensor | None = None) -> list[Tensor]:
    """`stages` disjoint bool masks (shape of the tensors) that partition the restorable positions,
    the most important part first."""
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    order = restore_order(current, accepted, in_norm)
    masks = []
    for part in torch.tensor_split(order, stages):      # n // stages each, the first n % stages one more
        m = torch.zeros(current.numel(), dtype=torch.bool)
        m[part] = True
        masks.append(m.reshape(current.shape))
    return masks


def stage_tensor(current: Tensor, accepted: Tensor, masks: list[Tensor], stage: int) -> Tensor:
    """The tensor after `stage` (1..len(masks)): `current` with masks[:stage] set to `accepted`'s values;
    the last stage returns `accepted` itself (a copy), whatever else differed."""
    n = len(masks)
    if not 1 <= stage <= n:
        raise ValueError(f"stage must be in 1..{n}, got {stage}")
    if stage == n:
        return accepted.clone()
    out = current.clone()
    for m in masks[:stage]:
        out[m] = accepted[m]
    return out


# ---- whole states (dicts of tensors, name -> tensor) ----------------------------------------------------

def _same_bits(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.detach().contiguous().reshape(-1), b.detach().contiguous().reshape(-1)
    return torch.equal(a, b) if a.dtype == torch.bool else torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def plan_states(current: dict[str, Tensor], accepted: dict[str, Tensor], stages: int,
                in_norms: dict[str, Tensor] | None = None) -> dict[str, list[Tensor]]:
    """Stage masks of every tensor whose bits differ between the two states (same names in both)."""
    if set(current) != set(accepted):
        raise ValueError("the two states hold different tensors")
    norms = in_norms or {}
    return {n: stage_masks(current[n], accepted[n], stages, norms.get(n))
            for n in current if not _same_bits(current[n], accepted[n])}


def restored_counts(masks: dict[str, list[Tensor]]) -> list[int]:
    """Positions restored after each stage, cumulative: [after stage 1, ..., after the last (= all)]."""
    stages = max((len(m) for m in masks.values()), default=0)
    per = [sum(int(m[i].sum()) for m in masks.values()) for i in range(stages)]
    return [sum(per[: i + 1]) for i in range(stages)]


def state_at_stage(current: dict[str, Tensor], accepted: dict[str, Tensor], masks: dict[str, list[Tensor]],
                   stage: int) -> dict[str, Tensor]:
    """The whole state after `stage`: unchanged tensors are `current`'s own (not copies)."""
    return {n: (stage_tensor(current[n], accepted[n], masks[n], stage) if n in masks else t)
            for n, t in current.items()}
