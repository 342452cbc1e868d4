"""What healing trains and how: parameter selection, masked Adam with float32 master weights.

Pruned weights stay exactly zero: their gradients are zeroed before each step (so Adam's moments there
stay zero) and the keep mask is multiplied in again after it. Parameters stored in bf16/f16 get a float32
master copy in the optimizer, so lr ~1e-4 updates are not rounded away; the model's tensor receives the
rounded master after every step. Under distributed healing the parameters and their masks are DTensors
sharded alike (heal.distributed.Sharded), and the same element-wise code masks each rank's shard.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from birdbone_core.model.layers import linear_modules


def norm_modules(layer: nn.Module) -> dict[str, nn.Module]:
    """Normalisation modules inside a block (RMSNorm/LayerNorm, incl. q/k norms), by relative name."""
    return {
        name: mod for name, mod in layer.named_modules()
        if name and not isinstance(mod, nn.Linear)
        and (isinstance(mod, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(mod).__name__.lower())
    }


def keep_masks(layer: nn.Module) -> dict[str, torch.Tensor]:
    """Current sparsity of every linear weight in `layer`: name -> bool keep mask (weight != 0).

    Modules without a single zero get no entry (nothing to enforce, nothing to store).
    """
    out = {}
    for name, mod in linear_modules(layer).items():
        keep = mod.weight.detach() != 0
        if not bool(keep.all()):
            out[name] = keep
    return out


def trainable_params(
    layer: nn.Module, trainable: str, masks: dict[str, torch.Tensor], prefix: str = "",
) -> list[tuple[str, nn.Parameter, torch.Tensor | None]]:
    """(name, parameter, keep mask or None) for what healing trains in one block.

    'weights': every linear weight (masked where `masks` names it) and linear bias; 'norms': norm scales
    and biases only.
    """
    out = []
    if trainable == "weights":
        for name, mod in linear_modules(layer).items():
            out.append((prefix + name + ".weight", mod.weight, masks.get(name)))
            if mod.bias is not None:
                out.append((prefix + name + ".bias", mod.bias, None))
    elif trainable == "norms":
        for name, mod in norm_modules(layer).items():
            for pname, p in mod.named_parameters(recurse=False):
                out.append((prefix + name + "." + pname, p, None))
    else:
        raise ValueError(f"trainable must be 'weights' or 'norms', got {trainable!r}")
    for _, p, keep in out:
        if keep is not None and keep.shape != p.shape:
            raise ValueError(f"mask shape {tuple(keep.shape)} != weight shape {tuple(p.shape)}")
    return out


@contextlib.contextmanager
def only_these_require_grad(module: nn.Module, params):
    """Freeze everything in `module` except `params`; restore the original flags afterwards."""
    saved = [(p, p.requires_grad) for p in module.parameters()]
    ids = {id(p) for p in params}
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in ids)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
            p.grad = None


class MaskedAdam:
    """AdamW over (param, keep mask) pairs; masks enforced after every step, f32 masters for low precision."""

    def __init__(self, items: list[tuple[nn.Parameter, torch.Tensor | None]], lr: float, steps: int,
                 weight_decay: float = 0.0, schedule: str = "cosine"):
        self.items = []
        masters = []
        for p, keep in items:
            if keep is not None:
                keep = keep.to(p.device)
                with torch.no_grad():
                    p.mul_(keep)
            master = p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_(True)
            self.items.append((p, keep, master))
            masters.append(master)
        self.opt = torch.optim.AdamW(masters, lr=lr, weight_decay=weight_decay) if masters else None
        self.lr, self.steps, self.schedule = lr, max(steps, 1), schedule
        self.t = 0

    def _lr_now(self) -> float:
        # linear warmup over the first 10% of steps: Adam's first updates move every weight by ~lr at once
        warm = min(1.0, (self.t + 1) / max(1, math.ceil(0.1 * self.steps)))
        if self.schedule == "constant":
            return self.lr * warm
        # cosine from lr down to lr/10 over the cycle
        return warm * self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(self.t, self.steps) / self.steps)))

    @torch.no_grad()
    def step(self) -> None:
        if self.opt is None:
            return
        for group in self.opt.param_groups:
            group["lr"] = self._lr_now()
        for p, keep, master in self.items:
            g = p.grad
            if g is None:
                continue
            if keep is not None:
                g.mul_(keep)
            if master is not p:
                master.grad = g.float()
        self.opt.step()
        self.t += 1
        for p, keep, master in self.items:
            if keep is not None:
                master.mul_(keep)
            if master is not p:
                p.copy_(master)
                master.grad = None
            p.grad = None
