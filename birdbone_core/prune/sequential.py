"""Layer-by-layer calibration: the plumbing that feeds the pruning kernels.

1. Capture the inputs of decoder layer 0 (and the keyword arguments every layer receives: masks,
   rotary tables) by swapping the layers for pass-through catchers; nothing but the embedding runs.
2. For each layer: run it dense with hooks that accumulate input statistics of its linear modules,
   prune each module with its kernel, run it again to get the inputs of the next layer.
Only one layer's inputs and outputs are held at a time ([n_samples, seq_len, d_model] each).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from birdbone_core.errors import BirdboneError
from birdbone_core.model.layers import decoder_layers, linear_modules
from birdbone_core.progress import progress_bar
from birdbone_core.prune import kernel_for
from birdbone_core.prune.config import Prune
from birdbone_core.runtime import model_device


class InputStats:
    """Running statistics of one linear module's inputs X [n_tokens, d_in].

    full=True keeps XtX [d_in, d_in] (SparseGPT's Hessian H = 2 XtX / n); otherwise only its
    diagonal (Wanda's ||X_j||^2). Accumulated on `device` (the inputs' own), whatever the weights' dtype.
    """

    def __init__(self, d_in: int, full: bool, device: torch.device | str = "cpu"):
        self.full = full
        # float32 XtX: float64 doubles the dominant cost (d_in^2 per token) for no measurable gain
        self.xtx = torch.zeros(d_in, d_in, dtype=torch.float32, device=device) if full else None
        self.sq = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.n_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if self.full:
            self.xtx.addmm_(x.T, x)
        self.sq += (x.double() ** 2).sum(0)
        self.n_tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return 2.0 / max(self.n_tokens, 1) * self.xtx

    def act_norm(self) -> torch.Tensor:
        return self.sq.sqrt().float()


class _Catcher(nn.Module):
    """Stands in for a decoder layer: records its call, returns the hidden states untouched."""

    def __init__(self, index: int, store: dict):
        super().__init__()
        self.index, self.store = index, store

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise RuntimeError("decoder layer called with positional extras; unsupported model code")
        if self.index == 0:
            self.store["hidden"].append(hidden_states.detach())
        self.store["kwargs"][self.index].append(kwargs)
        return hidden_states


@torch.no_grad()
def capture_layer_inputs(model, blocks: torch.Tensor, batch_size: int):
    """Run the model with catchers in place of its layers.

    blocks: [n_samples, seq_len] token ids (any device: each batch moves to the model's). Returns (hidden,
    kwargs): hidden is a list of layer-0 inputs per batch ([b, seq_len, d_model] each, on the model's
    device); kwargs[layer][batch] is what that layer is called with.
    """
    device = model_device(model)
    layers = decoder_layers(model)
    originals = list(layers)
    store = {"hidden": [], "kwargs": [[] for _ in originals]}
    try:
        for i in range(len(layers)):
            layers[i] = _Catcher(i, store)
        base = model.get_decoder()
        for batch in blocks.split(batch_size):
            base(input_ids=batch.to(device), use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return store["hidden"], store["kwargs"]


def layer_out(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def walk_paired_layers(model, dense, hidden: list, kwargs: list, dense_hidden: list, dense_kwargs: list,
                       description: str):
    """Walk the decoder layers of `model` and of its dense twin `dense` together, in order.

    hidden / dense_hidden: per-batch layer-0 inputs [b, seq_len, d_model] (from capture_layer_inputs),
    kwargs[layer][batch] likewise; the lists are advanced in place. Yields (i, layer, dense_layer) with
    dense_hidden already holding dense layer i's outputs (the targets) and hidden still holding layer i's
    inputs; once the caller's body is done, hidden moves on through layer i as the caller left it, so
    layer i+1 sees the error that reaches it.
    """
    layers, dense_layers = decoder_layers(model), decoder_layers(dense)
    if len(layers) != len(dense_layers):
        raise ValueError(f"model has {len(layers)} layers, dense model {len(dense_layers)}")
    with progress_bar(description, total=len(layers)) as advance:
        for i, (layer, dense_layer) in enumerate(zip(layers, dense_layers)):
            with torch.no_grad():
                for b, h in enumerate(dense_hidden):
                    dense_hidden[b] = layer_out(dense_layer, h, dense_kwargs[i][b])
            yield i, layer, dense_layer
            with torch.no_grad():
                for b, h in enumerate(hidden):
                    hidden[b] = layer_out(layer, h, kwargs[i][b])
            advance()


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


def attach_stats(modules: dict[str, nn.Linear], full: bool):
    """Hooks that accumulate input stats; modules fed the very same tensor (q/k/v, gate/up) share one."""
    stats: dict[str, InputStats] = {}
    seen: list[tuple[torch.Tensor, InputStats]] = []  # inputs of the current forward; cleared per batch

    def hook_for(name: str):
        def hook(module, inputs, output):
            x = inputs[0]
            for ref, acc in seen:
                if ref is x:
                    stats.setdefault(name, acc)
                    return
            acc = stats.setdefault(name, InputStats(x.shape[-1], full, x.device))
            acc.add(x)
            seen.append((x, acc))
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in modules.items()]
    return stats, seen, handles


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


def prune_sequential(model, blocks: torch.Tensor, cfg: Prune, description: str = "pruning") -> PruneReport:
    """Prune every linear module of every decoder layer in place, per the recipe section `cfg`."""
    check_pattern(model, cfg)
    t0 = time.perf_counter()
    report = PruneReport(method=cfg.method, pattern=cfg.pattern)
    kernel = kernel_for(cfg.method)
    full_names = {m: n for n, m in model.named_modules()}
    hidden, layer_kwargs = capture_layer_inputs(model, blocks, cfg.batch_size)
    layers = decoder_layers(model)

    with progress_bar(description, total=len(layers)) as advance:
        for i, layer in enumerate(layers):
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
            advance()

    report.seconds = time.perf_counter() - t0
    return report


def count_zeros(model, pattern: str = r".") -> tuple[int, int]:
    """(zeros, total) over the decoder layers' linear weights whose full name matches `pattern`."""
    zeros = total = 0
    rx = re.compile(pattern)
    names = {m: n for n, m in model.named_modules()}
    for layer in decoder_layers(model):
        for mod in linear_modules(layer).values():
            if rx.search(names[mod]):
                zeros += int((mod.weight == 0).sum())
                total += mod.weight.numel()
    return zeros, total
