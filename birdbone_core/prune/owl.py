"""OWL: outlier-weighted layerwise sparsity (Yin et al. 2023).

Layers whose Wanda scores |W_ij| * ||X_j|| hold more outliers (scores above M times the layer's mean)
carry more of the model's function, so they are pruned less. Per decoder layer l:

    D_l  = share of the layer's scores > M * mean(scores)                  (outlier ratio)
    d_l  = lam * (2 (D_l - min D) / (max D - min D) - 1)                   in [-lam, lam]
    s_l  = clip(target - d_l + c, target - lam, target + lam)

with the shift c chosen so that the mean of s_l weighted by each layer's prunable parameter count is
exactly `target` (the paper subtracts the plain mean of d_l; with clipping and unequal layers that no
longer hits the target, so c is solved for instead). Recipe:

    prune: {method: wanda, sparsity: 0.5, allocation: owl}            # M = 5, lam = 0.08 (paper's)
    prune: {..., allocation: {method: owl, m: 7, lam: 0.1}}
"""
from __future__ import annotations

import re

import torch

from birdbone_core.prune.config import Owl


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Share of all entries of `scores` (one layer's score matrices) above m times their joint mean."""
    flat = torch.cat([s.flatten().double() for s in scores])
    return float((flat > m * flat.mean()).double().mean())


def owl_sparsities(ratios: list[float], weights: list[float], target: float, lam: float,
                   max_sparsity: float = 0.99) -> list[float]:
    """Per-layer sparsities from outlier ratios (see module doc). Pure function of numbers.

    weights: each layer's prunable parameter count. The weighted mean of the result equals target (to
    ~1e-12) and every entry lies in [target - lam, target + lam] intersected with [0, max_sparsity].
    """
    if len(ratios) != len(weights) or not ratios:
        raise ValueError(f"need one weight per layer, got {len(ratios)} ratios and {len(weights)} weights")
    if not 0.0 <= target <= max_sparsity:
        raise ValueError(f"target sparsity {target} outside [0, {max_sparsity}]")
    r = torch.tensor(ratios, dtype=torch.float64)
    w = torch.tensor(weights, dtype=torch.float64)
    spread = float(r.max() - r.min())
    if lam == 0 or spread == 0:
        return [float(target)] * len(ratios)
    d = lam * (2 * (r - r.min()) / spread - 1)
    lo, hi = max(0.0, target - lam), min(max_sparsity, target + lam)

    def mean_at(c: float) -> float:
        return float((w * (target - d + c).clamp(lo, hi)).sum() / w.sum())

    a, b = -2 * lam - 1, 2 * lam + 1  # mean_at(a) = lo <= target <= hi = mean_at(b); monotone in c
    for _ in range(200):
        c = 0.5 * (a + b)
        a, b = (c, b) if mean_at(c) < target else (a, c)
    c = 0.5 * (a + b)
    return [float(x) for x in (target - d + c).clamp(lo, hi)]


@torch.no_grad()
def owl_layer_sparsity(model, blocks: torch.Tensor, target: float, cfg: Owl, *,
                       skip: list[str] | tuple[str, ...] = ()) -> dict[str, float]:
    """{regex of decoder layer i's module names: sparsity} for `model` (dense, unchanged) on calibration
    `blocks` [n, seq_len]; usable as Prune.layer_sparsity. Linear modules matching a `skip` regex are
    neither scored nor counted. Layers are walked in order on the model's own (dense) activations.
    """
    from birdbone_core.model.layers import decoder_layers, linear_modules
    from birdbone_core.model.walk import attach_stats, capture_layer_inputs, layer_out

    names = {mod: n for n, mod in model.named_modules()}
    hidden, kwargs = capture_layer_inputs(model, blocks, cfg.batch_size)
    prefixes, ratios, weights = [], [], []
    for i, layer in enumerate(decoder_layers(model)):
        mods = {n: mod for n, mod in linear_modules(layer).items()
                if not any(re.search(p, names[mod]) for p in skip)}
        stats, seen, handles = attach_stats(mods, full=False)
        try:
            for b, h in enumerate(hidden):
                seen.clear()
                hidden[b] = layer_out(layer, h, kwargs[i][b])
            seen.clear()
        finally:
            for hd in handles:
                hd.remove()
        if not mods:
            continue
        scores = [mod.weight.abs().float() * stats[n].act_norm().unsqueeze(0) for n, mod in mods.items()]
        prefixes.append("^" + re.escape(names[layer] + "."))
        ratios.append(outlier_ratio(scores, cfg.m))
        weights.append(float(sum(mod.weight.numel() for mod in mods.values())))
    if not prefixes:
        return {}
    return dict(zip(prefixes, owl_sparsities(ratios, weights, target, cfg.lam)))


def allocate(prune_cfg, model, blocks: torch.Tensor):
    """The prune section with OWL's per-layer map added (the recipe's own layer_sparsity entries come
    first, so they still win); unchanged for allocation 'uniform'. Compute it once, on the dense model,
    for the final target: waves scale layer_sparsity by their own target."""
    alloc = prune_cfg.allocation
    if not isinstance(alloc, Owl):
        return prune_cfg
    owl = owl_layer_sparsity(model, blocks, prune_cfg.sparsity, alloc, skip=prune_cfg.skip)
    merged = dict(prune_cfg.layer_sparsity)
    for k, v in owl.items():
        merged.setdefault(k, v)
    return prune_cfg.model_copy(update={"layer_sparsity": merged})
