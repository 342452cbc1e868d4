"""The quantizer's two whole-model passes on a model streamed layer by layer (model.stream.StreamedModel):
the calibration statistics and the measured trials, each decoder layer read from the checkpoint when its
turn comes and freed after it. The rest of the quantizer already reads one tensor at a time (the export
plans' loaders over StreamedModel.checkpoint_state).

    sens = stream_sensitivity(sm, blocks, SpilledTensors(dir))   # = calibration.collect_sensitivity(model, blocks)
    kls = stream_measured_kl(sm, [r.quantized, ...], held)        # = trials.measured_kl per allocation

Calibration, as gradient checkpointing at layer boundaries: one forward, layer by layer, keeps each layer's
input ([b, T, d] per batch, float32 on the model's device: 10 MB per layer for Gemma 3 270M at 16 x 256
tokens); the final norm and head give the loss gradient at the last layer's output; then backward, last
layer first: each layer is loaded again, recomputed from its kept input with grad (the collector's hooks
gather X^T X and the output g^2 on the way) and backpropagated into the gradient at its input. Each layer's
Hessians go to disk as soon as its backward is done. The same kernels see the same tensors in the same
order as in the whole-model pass, so the statistics are the same (tests/quant/test_quant_stream.py).

The trials run every allocation in lockstep: each layer is read once, and each allocation's hidden states go
through it with that allocation's decoded tensors swapped in (the originals put back after).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from birdbone_core.export.arch import arch_for, model_dims, plan_tensors
from birdbone_core.model.layers import decoder_layers, final_norm, linear_modules
from birdbone_core.model.stream import StreamedModel, layer_prefix
from birdbone_core.model.walk import capture_layer_inputs, layer_out
from birdbone_core.progress import progress_bar
from birdbone_core.quant.calibration import Collector, Sensitivity, head_loss_grad
from birdbone_core.quant.trials import KL_CHUNK_ELEMENTS, hf_weight, kl_sum
from birdbone_core.runtime import drop_mapped_pages


class SpilledTensors(Mapping):
    """Tensors kept on disk, one safetensors file each (names sharing a tensor share its file), read when
    asked for: the Hessians of a streamed calibration (a 1B Llama's are 5 GB in float32)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.files: dict[str, Path] = {}
        self.n_files = 0

    def put(self, names: list[str], t: torch.Tensor) -> None:
        path = self.directory / f"{self.n_files}.safetensors"
        save_file({"t": t.contiguous()}, str(path))
        self.n_files += 1
        self.files.update({n: path for n in names})

    def __getitem__(self, name: str) -> torch.Tensor:
        return load_file(str(self.files[name]))["t"]

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


class SpilledArrays:
    """Packed encodings kept on disk: put(a) writes a .npy file and returns it memory-mapped (read-only), so
    the candidates of every tensor take page cache, not the process's memory, until they are read."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.n = 0

    def __call__(self, a: np.ndarray) -> np.ndarray:
        path = self.directory / f"packed-{self.n}.npy"
        self.n += 1
        np.save(path, np.ascontiguousarray(a))
        return np.load(path, mmap_mode="r")


def stream_sensitivity(sm: StreamedModel, blocks: torch.Tensor, spill: SpilledTensors | None = None,
                       batch_size: int = 1) -> Sensitivity:
    """calibration.collect_sensitivity of `sm` on blocks [n, seq_len], one decoder layer in memory at a time
    (see the module docstring); Hessians go to `spill` (default: held in memory)."""
    model = sm.model
    layers = decoder_layers(model)
    for p in model.parameters():        # the layers' meta parameters too: a loaded layer keeps the flag, so
        p.requires_grad_(False)         # gradients flow through the layers, never into their weights
    col = Collector(model, spill)
    batches = list(blocks.split(batch_size))
    device = sm.device
    hidden, kwargs = capture_layer_inputs(model, blocks, batch_size)     # layer 0's inputs, per batch
    inputs: list[list[torch.Tensor] | None] = []                       # inputs[i][b]: layer i's input
    with progress_bar("calibration forward (layer by layer)", total=len(layers)) as advance:
        for i, layer in enumerate(layers):
            sm.load_layer(i)
            inputs.append(hidden)
            with torch.no_grad():
                hidden = [layer_out(layer, h, kwargs[i][b]) for b, h in enumerate(hidden)]
            sm.release_layer(i)
            advance()
    norm, head = final_norm(model), model.get_output_embeddings()
    handles = col.attach({"lm_head": head})
    grads = []
    with torch.enable_grad():
        for b, ids in enumerate(batches):
            col.seen.clear()
            h = hidden[b].detach().requires_grad_(True)
            y = norm(h)
            y.backward(head_loss_grad(model, y, ids.to(device)))
            grads.append(h.grad)
    col.close(handles)
    del hidden
    with progress_bar("calibration backward (layer by layer)", total=len(layers)) as advance:
        for i in reversed(range(len(layers))):
            sm.load_layer(i)
            layer = layers[i]
            handles = col.attach({layer_prefix(i) + n: m for n, m in linear_modules(layer).items()})
            with torch.enable_grad():
                for b in range(len(batches)):
                    col.seen.clear()
                    x = inputs[i][b].detach().requires_grad_(True)
                    layer_out(layer, x, kwargs[i][b]).backward(grads[b])
                    grads[b] = x.grad
            col.close(handles)
            inputs[i] = None
            sm.release_layer(i)
            advance()
    for ids, g in zip(batches, grads):    # layer 0's input is what the embedding returned
        col.add_lookups(ids.to(device), g)
    return col.finish(blocks, blocks.numel())


class _Decoded:
    """The decoded tensors of allocations (GGUF name -> (type, packed bytes)) in the HF layout of `sm`'s
    parameters, made when asked for."""

    def __init__(self, sm: StreamedModel):
        model = sm.model
        state = sm.checkpoint_state()
        self.spec = arch_for(model.config)
        self.dims = model_dims(model.config, state)
        plans = plan_tensors(model, self.spec, self.dims, model.config, state)
        self.gguf_name = {p.hf_name: p.gguf_name for p in plans if len(p.shape) == 2}
        self.shapes = {p.gguf_name: p.shape for p in plans}
        self.n_vocab = self.dims.n_vocab

    def swap(self, quantized: dict, hf_name: str, param: torch.nn.Parameter) -> torch.Tensor | None:
        """Put the allocation's decoded tensor for `hf_name` into `param`; returns the original storage."""
        name = self.gguf_name.get(hf_name)
        if name is None or name not in quantized:
            return None
        t, data = quantized[name]
        new = hf_weight(self.spec, self.dims, hf_name, t, data, self.shapes[name], param)
        drop_mapped_pages(data)                # a spilled encoding: its pages leave memory again
        old = param.data
        param.data = new
        return old


def _swapped(decoded: _Decoded, quantized: dict, module: torch.nn.Module, prefix: str) -> list:
    """Swap every parameter of `module` (named prefix + its own name) that the allocation holds."""
    out = []
    for n, p in module.named_parameters():
        old = decoded.swap(quantized, prefix + n, p)
        if old is not None:
            out.append((p, old))
    return out


def _restore(swapped: list) -> None:
    for p, old in swapped:
        p.data = old


def _log_probs(model, norm, h: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token log-probs [T - 1, vocab] float32 of one block's last hidden states h [1, T, d], as the
    model's own forward computes its logits (weight: the head's weight in place of its own)."""
    head = model.get_output_embeddings()
    y = norm(h)
    logits = (head(y) if weight is None else torch.nn.functional.linear(y, weight, head.bias))[0, :-1].float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits.log_softmax(-1)


def stream_measured_kl(sm: StreamedModel, allocations: list[dict], blocks: torch.Tensor) -> list[float]:
    """trials.measured_kl of each allocation (GGUF name -> (type, packed)) against the unquantized model,
    on held-out blocks [n, seq_len]: one read of each layer for all of them."""
    model = sm.model
    decoded = _Decoded(sm)
    layers = decoder_layers(model)
    emb, norm = model.get_input_embeddings(), final_norm(model)
    emb_name = next(n for n, p in model.named_parameters() if p is emb.weight)
    head = model.get_output_embeddings()
    head_name = next(n for n, p in model.named_parameters(remove_duplicate=False) if p is head.weight)
    hidden, kwargs = [], None
    with torch.no_grad():
        for q in [None, *allocations]:      # the base, then each allocation's own embedding lookups
            swapped = [] if q is None else _swapped(decoded, q, emb, emb_name.removesuffix("weight"))
            h, kw = capture_layer_inputs(model, blocks, 1)
            _restore(swapped)
            hidden.append(h)
            kwargs = kwargs or kw
        with progress_bar("measuring allocations (KL on held-out calibration, layer by layer)",
                          total=len(layers)) as advance:
            for i, layer in enumerate(layers):
                sm.load_layer(i)
                for v, q in enumerate([None, *allocations]):
                    swapped = [] if q is None else _swapped(decoded, q, layer, layer_prefix(i))
                    hidden[v] = [layer_out(layer, h, kwargs[i][b]) for b, h in enumerate(hidden[v])]
                    _restore(swapped)
                sm.release_layer(i)
                advance()
        kls = []
        for v, q in enumerate(allocations, start=1):
            swapped = _swapped(decoded, q, head, head_name.removesuffix("weight"))
            original = swapped[0][1] if swapped else head.weight
            total, n = 0.0, 0
            for h0, h in zip(hidden[0], hidden[v]):
                # the base's log-probs again for each allocation, not all blocks' held at once (4 x 256
                # tokens of a 262k vocabulary: 0.5 GB), rounded to float16 as the in-memory trials keep
                # them; a chunk of positions at a time ([positions, vocab] float32 temporaries)
                step = max(1, KL_CHUNK_ELEMENTS // decoded.n_vocab)
                for s in range(0, h.shape[1] - 1, step):
                    span = slice(s, min(s + step + 1, h.shape[1]))   # + the next position: log-probs drop the last
                    lp = _log_probs(model, norm, h0[:, span], original).to(torch.float16)
                    total += kl_sum(lp, _log_probs(model, norm, h[:, span]))
                    n += lp.shape[0]
                    del lp
            _restore(swapped)
            kls.append(total / max(n, 1))
    return kls
