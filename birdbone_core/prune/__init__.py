"""Pruning methods. Each kernel is a pure function of tensors and numbers; the registry below adapts
them to one call shape (W, input stats, sparsity, recipe section) for the layer-by-layer plumbing."""
from __future__ import annotations

from typing import Callable

import torch

from birdbone_core.prune.magnitude import magnitude_prune
from birdbone_core.prune.sparsegpt import sparsegpt_prune
from birdbone_core.prune.wanda import wanda_prune

Kernel = Callable[..., tuple[torch.Tensor, torch.Tensor]]
_REGISTRY: dict[str, Kernel] = {}


def register(name: str):
    def deco(fn: Kernel) -> Kernel:
        _REGISTRY[name] = fn
        return fn
    return deco


def kernel_for(method: str) -> Kernel:
    if method not in _REGISTRY:
        raise KeyError(f"unknown pruning method {method!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[method]


@register("magnitude")
def _magnitude(W, stats, sparsity, cfg):
    return magnitude_prune(W, sparsity, cfg.nm)


@register("wanda")
def _wanda(W, stats, sparsity, cfg):
    return wanda_prune(W, stats.act_norm(), sparsity, cfg.nm)


@register("sparsegpt")
def _sparsegpt(W, stats, sparsity, cfg):
    return sparsegpt_prune(W, stats.hessian(), sparsity, cfg.nm, cfg.sparsegpt.blocksize, cfg.sparsegpt.percdamp)
