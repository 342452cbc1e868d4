"""LoRA / QLoRA healing with PEFT: train low-rank adapters, merge them into the fp32 weights, re-mask.

`LoraSession(root, modules, masks, cfg, quantize)` swaps adapters in for the chosen linear modules of
`root` (one decoder layer for block-wise healing, the whole model for distillation):

    lora    PEFT LoRA around the original nn.Linear (its weight frozen): y = x W^T + s x A^T B^T,
            A [r, d_in], B [d_out, r], s = alpha / r, B initialised to zero.
    qlora   the same over a bitsandbytes nf4 `Linear4bit` base (4-bit codes + per-64 absmax): the
            trained model holds the base in 4 bits; the fp32 originals wait in host memory, which is
            where QLoRA's saving is on an accelerator, for the merge.

`merge()` adds PEFT's delta s B A to the original fp32 weight and multiplies the keep mask in again,
so pruned positions are exactly zero afterwards (bit-exact: x * 0.0 = 0.0), and puts the plain
nn.Linear back. `abort()` restores the untouched originals. Adapter initialisation draws from a
forked RNG seeded by `seed`, so a healing step rerun gives the same weights.

PEFT on CPU needs two settings (see STACK-NOTES): `is_loaded_in_4bit` on the root so PEFT picks its
4-bit LoRA layer, and `support_avx512bf16_for_cpu = False` on every Linear4bit (else the weights are
repacked on the first eval forward and training breaks).
"""
from __future__ import annotations

import re

import torch
from torch import nn

from birdbone_core.heal.config import Lora


def select_targets(modules: dict[str, nn.Linear], patterns: list[str]) -> list[str]:
    """Names of `modules` matching any regex in `patterns` (all of them when `patterns` is empty)."""
    if not patterns:
        return list(modules)
    return [n for n in modules if any(re.search(p, n) for p in patterns)]


def to_nf4(linear: nn.Linear) -> nn.Module:
    """A bitsandbytes nf4 Linear4bit holding `linear`'s weight quantized to 4 bits (bias kept as is)."""
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=torch.float32, quant_type="nf4", device="meta")
    q.weight = bnb.nn.Params4bit(linear.weight.detach().float().clone(), requires_grad=False,
                                 quant_type="nf4", module=q)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False)
    q.support_avx512bf16_for_cpu = False
    q.weight._quantize(linear.weight.device)  # now uint8 codes [d_out * d_in / 2, 1] + quant_state
    return q


class LoraSession:
    """Adapters on `modules` (name relative to `root` -> nn.Linear inside it); see the module doc."""

    def __init__(self, root: nn.Module, modules: dict[str, nn.Linear], masks: dict[str, torch.Tensor],
                 cfg: Lora, quantize: bool = False, seed: int = 0):
        from peft import LoraConfig, inject_adapter_in_model

        self.root, self.quantize = root, quantize
        self.names = select_targets(modules, cfg.targets)
        if not self.names:
            raise ValueError(f"no linear module matches the LoRA targets {cfg.targets}")
        self.flags = [(p, p.requires_grad) for p in root.parameters()]
        self.had_peft_config = "peft_config" in vars(root)  # PEFT leaves its config on the root
        self.originals = {n: (modules[n], masks.get(n)) for n in self.names}
        if quantize:
            for n in self.names:
                root.set_submodule(n, to_nf4(modules[n]))
            root.is_loaded_in_4bit = True  # PEFT reads this to wrap Linear4bit with its 4-bit LoRA layer
        config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                            target_modules=list(self.names))
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                inject_adapter_in_model(config, root)
        except Exception:
            self._put_back()
            raise
        self.wrappers = {n: root.get_submodule(n) for n in self.names}

    def parameters(self) -> list[nn.Parameter]:
        """The trainable adapter matrices (lora_A, lora_B of every wrapped module)."""
        out = []
        for w in self.wrappers.values():
            out += [w.lora_A["default"].weight, w.lora_B["default"].weight]
        return out

    def base_layers(self) -> dict[str, nn.Module]:
        """What the adapters sit on while training: nn.Linear (lora) or bnb Linear4bit (qlora)."""
        return {n: w.base_layer for n, w in self.wrappers.items()}

    @torch.no_grad()
    def merge(self) -> None:
        """W <- (W_fp32 + s B A) * keep for every wrapped module; plain nn.Linear modules back in place."""
        for n, wrapper in self.wrappers.items():
            linear, keep = self.originals[n]
            delta = wrapper.get_delta_weight("default")                     # [d_out, d_in]
            merged = linear.weight.float() + delta.float()
            if keep is not None:
                merged.mul_(keep.to(merged.device))
            linear.weight.copy_(merged.to(linear.weight.dtype))
        self._put_back()

    def abort(self) -> None:
        """Drop the adapters; the original modules (weights untouched) go back in place."""
        self._put_back()

    def _put_back(self) -> None:
        for n, (linear, _) in self.originals.items():
            self.root.set_submodule(n, linear)
        if self.quantize and "is_loaded_in_4bit" in vars(self.root):
            del self.root.is_loaded_in_4bit
        if not self.had_peft_config and "peft_config" in vars(self.root):
            del self.root.peft_config
        for p, flag in self.flags:
            p.requires_grad_(flag)
