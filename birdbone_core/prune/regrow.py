"""Regrowth: move a little density from where it carries no load to where it is missed (RigL / DSnoT).

After a wave is pruned and healed, revive the n pruned positions that would help most and drop the n
weakest survivors, so every module keeps exactly its zero count. Two criteria:

    rigl   revive where |dL/dW| of the block reconstruction loss is largest (Evci et al. 2020), drop the
           smallest |W|; n = fraction * (pruned count) swaps per module.
    dsnot  training-free, from the layer-local reconstruction error (Zhang et al. 2023, DSnoT): with
           D = W_dense - W, G = X^T X of the module's inputs X [tokens, d_in] on the current model,
           reviving (i, j) at the dense value v lowers sum_i ||D_i X^T||^2 by  2 v (D G)_ij - v^2 G_jj,
           dropping survivor w raises it by  2 w (D G)_ij + w^2 G_jj.  Swaps go in rounds of at most one
           per row, each only if the exact change of the pair is negative, C updated after each round
           (at most fraction * pruned swaps): the local error falls monotonically.

With `steps`, each layer is healed block-wise for that many steps right after its swaps (RigL trains
the revived weights; after a healing step the survivors have moved away from the dense values, so a
swap alone rarely helps there). Revived weights take the dense model's value at that position: the value the weight had before it was
pruned, which is what DSnoT's criterion above scores, and it is never zero (positions where the dense
weight is zero cannot be revived: a zero there would read as "still pruned" to the mask logic).
With an N:M pattern swaps happen inside one group of M inputs, so each group keeps its N zeros.
"""
from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field


class Regrow(BaseModel):
    """The `waves.regrow:` recipe section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["rigl", "dsnot"] = Field("rigl", description="revive by |gradient| (rigl) or by the "
                                                                 "reconstruction-error criterion (dsnot)")
    fraction: float = Field(0.05, gt=0, le=0.2, description="swaps per module per wave, as a fraction of "
                                                            "its pruned weights")
    batch_size: int = Field(8, ge=1, description="calibration samples per forward batch")
    steps: int = Field(0, ge=0, description="block-wise healing steps per layer right after its swaps "
                                            "(RigL trains revived weights; 0 = swap only)")
    lr: float = Field(2e-4, gt=0, le=1.0, description="lr of those steps")
    revert_if_worse: bool = Field(
        True, description="undo a layer's swaps if its reconstruction error vs the dense layer rose")


def regrow_mask(
    W: torch.Tensor,
    keep: torch.Tensor,
    grow_score: torch.Tensor,
    keep_score: torch.Tensor | None = None,
    n: int = 0,
    nm: tuple[int, int] | None = None,
    paired: bool = False,
) -> torch.Tensor:
    """The keep mask after at most n swaps. Pure function of tensors.

    W, keep, grow_score, keep_score: [d_out, d_in]. grow_score is read at pruned positions (higher =
    revive first; -inf or NaN = never), keep_score at survivors (lower = drop first; default |W|;
    +inf = never). Unstructured: the n best pruned positions of the whole matrix are revived and the n
    weakest survivors dropped (revived ones are not survivors, so never dropped again). N:M (nm=(N, M)):
    one swap in each of the n groups of M inputs with the best candidate, inside that group. paired:
    scores share units; the k-th best revival is paired with the k-th cheapest drop (per group for
    N:M) and only pairs with grow > keep score are swapped. The number of False entries never changes.
    """
    if keep.shape != W.shape or grow_score.shape != W.shape:
        raise ValueError(f"keep {tuple(keep.shape)} / grow_score {tuple(grow_score.shape)} must match W "
                         f"{tuple(W.shape)}")
    keep = keep.bool()
    ks = W.abs() if keep_score is None else keep_score
    if ks.shape != W.shape:
        raise ValueError(f"keep_score {tuple(ks.shape)} must match W {tuple(W.shape)}")
    inf = torch.tensor(float("inf"), device=W.device)
    g = torch.where(~keep & ~torch.isnan(grow_score), grow_score.double(), -inf)   # revival candidates
    k = torch.where(keep & ~torch.isnan(ks), ks.double(), inf)                      # drop candidates
    new = keep.clone()
    if n <= 0:
        return new
    if nm is None:
        n = min(n, int(torch.isfinite(g).sum()), int(torch.isfinite(k).sum()))
        if n == 0:
            return new
        gain, grow = torch.topk(g.flatten(), n)
        cost, drop = torch.topk(k.flatten(), n, largest=False)
        if paired:  # gains fall, costs rise along the pairs: the profitable ones are a prefix
            n = int((gain > cost).sum())
            grow, drop = grow[:n], drop[:n]
        new.view(-1)[grow] = True
        new.view(-1)[drop] = False
        return new

    _, m = nm
    d_out, d_in = W.shape
    if d_in % m:
        raise ValueError(f"N:M pattern {nm[0]}:{m} needs the input width ({d_in}) to be a multiple of {m}")
    gg, kk = g.reshape(-1, m), k.reshape(-1, m)                 # [groups, m]
    gain, gi = gg.max(1)
    cost, ki = kk.min(1)
    ok = torch.isfinite(gain) & torch.isfinite(cost)
    prio = gain - cost if paired else gain
    if paired:
        ok &= gain > cost
    prio = torch.where(ok, prio, -inf)
    n = min(n, int(ok.sum()))
    if n == 0:
        return new
    groups = torch.topk(prio, n).indices
    flat = new.view(-1, m)
    flat[groups, gi[groups]] = True
    flat[groups, ki[groups]] = False
    return new


def dsnot_mask(
    W: torch.Tensor,
    W_dense: torch.Tensor,
    keep: torch.Tensor,
    xtx: torch.Tensor,
    n: int,
    nm: tuple[int, int] | None = None,
) -> torch.Tensor:
    """DSnoT-style swaps: the keep mask after at most n swaps that each lower the local error.

    W, W_dense, keep: [d_out, d_in]; xtx = X^T X [d_in, d_in] of the module's inputs. The error is
    sum_i ||r_i||^2 with r_i = (W_dense - W)_i X^T (rows are independent). Rounds of at most one swap per
    row: revive the position with the largest gain 2 v C_ij - v^2 G_jj (v = its dense value, C = D G),
    drop the survivor with the smallest cost 2 w C_ij + w^2 G_jj, and swap only if the exact change of
    the pair, cost - gain - 2 v w G_gd, is negative; C is updated exactly after each round. Revived
    positions are never dropped and dropped ones never revived within one call. With nm=(N, M) the pair
    lies inside one group of M inputs (the group with the best gain - cost of its row).
    """
    if keep.shape != W.shape or W_dense.shape != W.shape or xtx.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"shapes do not match: W {tuple(W.shape)}, W_dense {tuple(W_dense.shape)}, "
                         f"keep {tuple(keep.shape)}, xtx {tuple(xtx.shape)}")
    d_out, d_in = W.shape
    if nm is not None and d_in % nm[1]:
        raise ValueError(f"N:M pattern {nm[0]}:{nm[1]} needs the input width ({d_in}) to be a multiple of {nm[1]}")
    keep = keep.bool().clone()
    Wd, G = W_dense.double(), xtx.double()
    Wc = W.double() * keep
    C = (Wd - Wc) @ G                                         # [d_out, d_in]: <r_i, x_j>
    diag = torch.diagonal(G).unsqueeze(0)
    frozen_in = ~keep & (Wd == 0)                             # a zero dense value cannot be revived
    fresh = torch.zeros_like(keep)                            # revived in this call: never dropped
    gone = torch.zeros_like(keep)                             # dropped in this call: never revived
    rows = torch.arange(d_out, device=W.device)
    done = 0
    while done < n:
        gain = torch.where(~keep & ~frozen_in & ~gone, 2 * Wd * C - Wd.pow(2) * diag, float("-inf"))
        cost = torch.where(keep & ~fresh, 2 * Wc * C + Wc.pow(2) * diag, float("inf"))
        if nm is None:
            g_idx, d_idx = gain.argmax(1), cost.argmin(1)
        else:
            m = nm[1]
            gg, gi = gain.view(d_out, -1, m).max(-1)          # [d_out, groups]
            cc, ci = cost.view(d_out, -1, m).min(-1)
            best = torch.where(torch.isfinite(gg) & torch.isfinite(cc), cc - gg, float("inf")).argmin(1)
            g_idx = best * m + gi[rows, best]
            d_idx = best * m + ci[rows, best]
        v, w = Wd[rows, g_idx], Wc[rows, d_idx]
        delta = cost[rows, d_idx] - gain[rows, g_idx] - 2 * v * w * G[g_idx, d_idx]
        delta = torch.where(torch.isfinite(delta), delta, float("inf"))
        todo = (delta < 0).nonzero().flatten()
        if todo.numel() == 0:
            break
        if todo.numel() > n - done:                           # budget: the best rows first
            todo = todo[torch.topk(delta[todo], n - done, largest=False).indices]
        r, g, d = todo, g_idx[todo], d_idx[todo]
        keep[r, g], keep[r, d] = True, False
        fresh[r, g], gone[r, d] = True, True
        Wc[r, g], Wc[r, d] = v[todo], 0.0
        C[r] += -v[todo, None] * G[g] + w[todo, None] * G[d]  # D_r gains -v e_g + w e_d
        done += todo.numel()
    return keep


def _block_grads(layer, weights, inputs, targets, layer_kwargs) -> list[torch.Tensor]:
    """Gradient of the mean block MSE (over all cached batches) w.r.t. each weight [d_out, d_in]."""
    from birdbone_core.heal.blockwise import block_loss
    from birdbone_core.heal.train import only_these_require_grad
    from birdbone_core.model.walk import layer_out

    total = sum(x.shape[0] for x in inputs)
    with only_these_require_grad(layer, weights):
        for x, y, kw in zip(inputs, targets, layer_kwargs):
            (block_loss(layer_out(layer, x, kw), y, "mse") * (x.shape[0] / total)).backward()
        return [p.grad.detach().clone() for p in weights]


def _input_gram(layer, modules: dict, inputs, layer_kwargs) -> dict[str, torch.Tensor]:
    """X^T X [d_in, d_in] of each named linear module's inputs, from one pass over the cached batches."""
    from birdbone_core.model.walk import attach_stats, layer_out

    stats, seen, handles = attach_stats(modules, full=True)
    try:
        with torch.no_grad():
            for x, kw in zip(inputs, layer_kwargs):
                seen.clear()
                layer_out(layer, x, kw)
            seen.clear()
    finally:
        for h in handles:
            h.remove()
    return {name: stats[name].xtx for name in modules}


def regrow_model(model, dense, blocks: torch.Tensor, cfg: Regrow, *, nm: tuple[int, int] | None = None,
                 description: str = "regrowth") -> dict:
    """Swap pruned and surviving weights of every decoder layer of `model` in place (see module doc).

    dense: the dense model (same architecture) whose values revived weights take; blocks [n, seq_len]
    calibration token ids. Layers are walked in order, each fed the current model's own inputs (so a
    layer's criterion sees the error reaching it), targets from the dense model. nm: the recipe's N:M
    pattern, if any. Returns a JSON-able report: per module its pruned count and swaps, per layer the
    relative reconstruction error before/after and whether its swaps were reverted.
    """
    from birdbone_core.heal.blockwise import block_error, heal_block
    from birdbone_core.heal.train import keep_masks
    from birdbone_core.model.layers import linear_modules
    from birdbone_core.model.walk import capture_layer_inputs, walk_paired_layers

    t0 = time.perf_counter()
    report = {"method": cfg.method, "fraction": cfg.fraction, "swapped": 0, "modules": {}, "layers": []}
    names = {m: n for n, m in model.named_modules()}
    hidden, kwargs = capture_layer_inputs(model, blocks, cfg.batch_size)
    dense_hidden, dense_kwargs = capture_layer_inputs(dense, blocks, cfg.batch_size)
    for i, layer, dense_layer in walk_paired_layers(model, dense, hidden, kwargs, dense_hidden, dense_kwargs,
                                                    description):
        masks = keep_masks(layer)
        mods, dmods = linear_modules(layer), linear_modules(dense_layer)
        entry = {"layer": i, "swapped": 0, "reverted": False}
        if masks:
            _, entry["rel_error_before"] = block_error(layer, hidden, dense_hidden, kwargs[i], "mse")
            if cfg.method == "rigl":
                grads = _block_grads(layer, [mods[n].weight for n in masks], hidden, dense_hidden, kwargs[i])
                grads = dict(zip(masks, grads))
            else:
                grams = _input_gram(layer, {n: mods[n] for n in masks}, hidden, kwargs[i])
            saved = {k: v.clone() for k, v in layer.state_dict().items()}
            for name, keep in masks.items():
                W, Wd = mods[name].weight, dmods[name].weight.detach()
                zeros = int((~keep).sum())
                n = int(cfg.fraction * zeros)
                if cfg.method == "rigl":
                    grow = torch.where(Wd != 0, grads[name].abs().double(), float("-inf"))
                    new = regrow_mask(W.detach(), keep, grow, None, n, nm)
                else:
                    new = dsnot_mask(W.detach(), Wd, keep, grams[name], n, nm)
                revived, dropped = new & ~keep, keep & ~new
                n_sw = int(revived.sum())
                with torch.no_grad():
                    W[revived] = Wd[revived].to(W.dtype)
                    W[dropped] = 0
                report["modules"][names[mods[name]]] = {"pruned": zeros, "swapped": n_sw}
                entry["swapped"] += n_sw
            if cfg.steps > 0 and entry["swapped"]:
                heal_block(layer, hidden, dense_hidden, kwargs[i], keep_masks(layer), cfg.steps, cfg.lr,
                           "weights", revert_if_worse=False, seed=i)
            _, entry["rel_error_after"] = block_error(layer, hidden, dense_hidden, kwargs[i], "mse")
            if cfg.revert_if_worse and entry["rel_error_after"] > entry["rel_error_before"]:
                layer.load_state_dict(saved)
                for name in masks:
                    report["modules"][names[mods[name]]]["swapped"] = 0
                entry.update(reverted=True, swapped=0, rel_error_after=entry["rel_error_before"])
            report["swapped"] += entry["swapped"]
        report["layers"].append(entry)
    report["seconds"] = time.perf_counter() - t0
    return report
