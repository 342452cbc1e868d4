"""Layer-by-layer pruning: the plumbing that feeds the pruning kernels, on the layer walk of
birdbone_core.model.walk.

1. Capture the inputs of decoder layer 0 (and the keyword arguments every layer receives).
2. For each layer: run it dense with hooks that accumulate input statistics of its linear modules,
   prune each module with its kernel, run it again to get the inputs of the next layer.
Only one layer's inputs and outputs are held at a time ([n_samples, seq_len, d_model] each).
"""
from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from birdbone_core.errors import BirdboneError
from birdbone_core.model.layers import decoder_layers, linear_modules
from birdbone_core.model.walk import attach_stats, capture_layer_inputs, layer_out
from birdbone_core.progress import progress_bar
from birdbone_core.prune import kernel_for
from birdbone_core.prune.config import Prune


@dataclass
class ModuleResult:
    name: str
    shape: tuple[int, int]
    target_sparsity: float
    sparsity: float


@dataclass
class PruneReport:
    method: str
    pattern: str
    modules: list[ModuleResult] = field(default_factory=list)
    layer_rel_error: list[float] = field(default_factory=list)  # ||Y_pruned - Y_dense|| / ||Y_dense|| per layer
    seconds: float = 0.0

    def overall_sparsity(self) -> float:
        total = sum(m.shape[0] * m.shape[1] for m in self.modules)
        zeros = sum(m.sparsity * m.shape[0] * m.shape[1] for m in self.modules)
        return zeros / max(total, 1)


@torch.no_grad()
def check_pattern(model, cfg: Prune) -> None:
    """Refuse an N:M pattern that does not divide the input width of every module it would prune (the
    mask groups each row's inputs in runs of M), before any work."""
    if cfg.nm is None:
        return
    n, m = cfg.nm
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.startswith(_decoder_prefix(model)) \
                and (cfg.sparsity_for(name) or 0) > 0 and mod.in_features % m:
            raise BirdboneError(f"prune.pattern {n}:{m}: {name} has {mod.in_features} inputs, not a multiple of "
                                f"{m}; choose an M that divides it or skip the module (prune.skip)")


def _decoder_prefix(model) -> str:
    names = {m: n for n, m in model.named_modules()}
    layers = decoder_layers(model)
    return names[layers[0]].rsplit(".", 1)[0] if len(layers) else ""


@torch.no_grad()    # else each layer's forward keeps its weights and inputs alive in an autograd graph
def prune_sequential(model, blocks: torch.Tensor, cfg: Prune, description: str = "pruning",
                     before_layer: Callable[[int], None] | None = None,
                     after_layer: Callable[[int], None] | None = None) -> PruneReport:
    """Prune every linear module of every decoder layer in place, per the recipe section `cfg`.

    before_layer(i) / after_layer(i): called around layer i's turn; a streamed model
    (birdbone_core.model.stream) loads the layer's weights in the first and writes and frees them in the second.
    """
    check_pattern(model, cfg)
    t0 = time.perf_counter()
    report = PruneReport(method=cfg.method, pattern=cfg.pattern)
    kernel = kernel_for(cfg.method)
    full_names = {m: n for n, m in model.named_modules()}
    hidden, layer_kwargs = capture_layer_inputs(model, blocks, cfg.batch_size)
    layers = decoder_layers(model)

    with progress_bar(description, total=len(layers)) as advance:
        for i, layer in enumerate(layers):
            if before_layer is not None:
                before_layer(i)
            modules = linear_modules(layer)
            targets = {}
            for name, mod in modules.items():
                s = cfg.sparsity_for(full_names[mod])
                if s is not None and s > 0:
                    targets[name] = (mod, s)
            stats, seen, handles = attach_stats({n: m for n, (m, _) in targets.items()}, cfg.method == "sparsegpt")
            dense_out = []
            try:
                for b, h in enumerate(hidden):
                    seen.clear()
                    dense_out.append(layer_out(layer, h, layer_kwargs[i][b]))
                seen.clear()
            finally:
                for hd in handles:
                    hd.remove()

            for name, (mod, s) in targets.items():
                W = mod.weight.data
                new_W, keep = kernel(W, stats[name], s, cfg)
                mod.weight.data.copy_(new_W.to(W.dtype))
                report.modules.append(ModuleResult(
                    name=full_names[mod], shape=tuple(W.shape), target_sparsity=s,
                    sparsity=1.0 - keep.float().mean().item(),
                ))
            del stats

            num = den = 0.0
            for b, h in enumerate(hidden):
                out = layer_out(layer, h, layer_kwargs[i][b])
                num += (out - dense_out[b]).float().pow(2).sum().item()
                den += dense_out[b].float().pow(2).sum().item()
                hidden[b] = out
            report.layer_rel_error.append((num / max(den, 1e-30)) ** 0.5)
            del dense_out
            if after_layer is not None:
                after_layer(i)
            advance()

    report.seconds = time.perf_counter() - t0
    return report


def count_zeros(model, pattern: str = r".", state: Mapping[str, torch.Tensor] | None = None) -> tuple[int, int]:
    """(zeros, total) over the decoder layers' linear weights whose full name matches `pattern`; with
    `state`, the weights are read from it by name, one at a time (a streamed model on the meta device)."""
    zeros = total = 0
    rx = re.compile(pattern)
    names = {m: n for n, m in model.named_modules()}
    for layer in decoder_layers(model):
        for mod in linear_modules(layer).values():
            if rx.search(names[mod]):
                w = mod.weight if state is None else state[f"{names[mod]}.weight"]
                zeros += int((w == 0).sum())
                total += w.numel()
    return zeros, total
