"""Healing: train a pruned model back toward the dense one, pruning masks enforced (zeros stay zero).

    blockwise  per decoder layer, MSE to the dense layer's output (birdbone_core.heal.blockwise)
    distill    end to end, KL to the dense model's cached top-k next-token logits (heal.distill)
    none       nothing

What trains (`trainable`): surviving weights, norms only, or LoRA / QLoRA adapters merged back into the
fp32 weights with the mask re-applied (heal.lora). `heal(...)` picks the method from the recipe section
and applies the wave taper (`schedule`). When a torch.distributed process group with more than one rank
is up (`heal.distributed.init_distributed()`, under torchrun), both methods train on torch FSDP2: each
rank heals its shard of each minibatch, the trainable weights (with their gradients, Adam state and
masks) are sharded over the ranks, gradients are summed, and the full healed weights are gathered back
into the model on every rank (heal.distributed).
"""
from __future__ import annotations

import torch

from birdbone_core.heal.config import HEAL_METHODS, TRAINABLE, Heal, Lora, healing_data, schedule

__all__ = ["HEAL_METHODS", "TRAINABLE", "Heal", "Lora", "heal", "healing_data", "schedule"]


def heal(model, dense_model, blocks: torch.Tensor, cfg: Heal, wave: int = 1, n_waves: int = 1,
         description: str = "healing"):
    """Heal `model` in place toward `dense_model` on `blocks` [n, seq_len] after pruning wave `wave` of
    `n_waves`. Returns a HealReport (blockwise), a DistillReport (distill) or None (method 'none')."""
    steps, lr = schedule(cfg, wave, n_waves)
    if cfg.method == "none":
        return None
    if cfg.method == "blockwise":
        from birdbone_core.heal.blockwise import heal_blockwise
        return heal_blockwise(model, dense_model, blocks, cfg, steps=steps, lr=lr, description=description)
    if cfg.method == "distill":
        from birdbone_core.heal.distill import heal_distill
        return heal_distill(model, dense_model, blocks, cfg, steps=steps, lr=lr, description=description)
    raise ValueError(f"unknown heal method {cfg.method!r}; known: {', '.join(HEAL_METHODS)}")
