"""The layer walk: calibration data through a model's decoder layers one at a time, and the input
statistics its linear modules see on the way. Every layer-by-layer algorithm (pruning, OWL, regrowth,
block-wise healing, structured pruning) walks with these.

    hidden, kwargs = capture_layer_inputs(model, blocks, batch_size)   # layer 0's inputs, per batch
    for i, layer in enumerate(decoder_layers(model)):
        stats, seen, handles = attach_stats(linear_modules(layer), full=True)   # X^T X per module
        ...  hidden[b] = layer_out(layer, hidden[b], kwargs[i][b])   # on to layer i + 1
    walk_paired_layers(model, dense, ...)    # the same walk beside a dense twin (its outputs = targets)

Layer-0 inputs are captured by swapping the layers for pass-through catchers, so nothing but the
embedding runs; only one layer's inputs and outputs are held at a time ([n_samples, seq_len, d_model]).
"""
from __future__ import annotations

import torch
from torch import nn

from birdbone_core.model.layers import decoder_layers
from birdbone_core.progress import progress_bar
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
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (the quantizer's calibration pass runs with grad)
        if self.full:
            self.xtx.addmm_(x.T, x)
        self.sq += (x.double() ** 2).sum(0)
        self.n_tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return 2.0 / max(self.n_tokens, 1) * self.xtx

    def mean_square(self) -> torch.Tensor:
        """E[x_j^2] per input column [d_in] float32 (llama.cpp's imatrix value)."""
        return (self.sq / max(self.n_tokens, 1)).float()

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
