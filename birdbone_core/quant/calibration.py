"""Calibration statistics for the quantizer: one forward + backward pass over calibration blocks gives,
for every linear module, H = E[x x^T] of its inputs and F = E[g^2] per output channel (g = dLoss/d output,
the next-token cross-entropy), and for the token embedding the per-row E[|g|^2] of its lookups.

    collect_sensitivity(model, blocks [n, seq_len], batch_size) -> Sensitivity
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from birdbone_core.model.walk import InputStats, attach_stats
from birdbone_core.progress import progress_bar


@dataclass
class Sensitivity:
    # module -> E[x x^T] [in, in] (a streamed pass keeps them on disk: quant.stream.SpilledTensors)
    hessian: Mapping[str, torch.Tensor] = field(default_factory=dict)
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> E[g^2] [out]
    # the embedding's lookups: for each row v seen in calibration, the per-dimension E over tokens of
    # (dL/dE_v)^2 (zero for tokens that are not v); rows never looked up carry no lookup term
    embed_ids: torch.Tensor | None = None  # [m] int64 rows seen
    embed_g2: torch.Tensor | None = None  # [m, d] float32
    n_tokens: int = 0


class Collector:
    """The hooks of a calibration pass and what they gather: X^T X of every linear module's inputs (the
    layer walk's collector, `model.walk.attach_stats`: float32, q/k/v and gate/up share one), E[g^2] of
    its output gradients (float64), and the embedding lookups' gradients. `attach(modules)` hooks a set of
    modules (the whole model, or one decoder layer of a streamed one); `finish` gives the Sensitivity."""

    def __init__(self, model: torch.nn.Module, spill=None):
        """spill: where each finished Hessian goes (quant.stream.SpilledTensors: a streamed pass keeps them
        on disk); default: held in memory."""
        emb = model.get_input_embeddings()
        self.d_model = emb.weight.shape[1]
        self.scale = float(getattr(emb, "scalar_embed_scale", 1.0) or 1.0)  # Gemma scales lookups by sqrt(d)
        self.g2: dict[str, torch.Tensor] = {}
        self._attached: dict[str, InputStats] = {}   # X^T X of the modules hooked now (attach .. close)
        self.seen: list = []            # inputs of the current forward: cleared per batch
        self.emb_ids: list[torch.Tensor] = []
        self.emb_g2: list[torch.Tensor] = []
        self.spill = spill
        self.hessian: Mapping[str, torch.Tensor] = {} if spill is None else spill

    def attach(self, modules: dict[str, torch.nn.Linear]) -> list:
        """Forward hooks on `modules` (full names): their input X^T X and, on backward, their output g^2."""
        stats, self.seen, handles = attach_stats(modules, full=True)
        self._attached = stats

        def fwd(name):
            def hook(mod, inp, out):
                if out.requires_grad:
                    out.register_hook(lambda g: self._add_g2(name, g))
            return hook
        return handles + [m.register_forward_hook(fwd(n)) for n, m in modules.items()]

    def _add_g2(self, name, g):
        s = (g.detach().double() ** 2).reshape(-1, g.shape[-1]).sum(0)
        self.g2[name] = self.g2[name] + s if name in self.g2 else s

    def add_lookups(self, ids: torch.Tensor, g: torch.Tensor) -> None:
        """The embedding's lookups ids [b, T] and the loss gradient g [b, T, d] of what they returned."""
        self.emb_ids.append(ids.reshape(-1).clone())
        self.emb_g2.append((g.detach().double() ** 2).reshape(ids.numel(), -1) * self.scale ** 2)

    def close(self, handles: list) -> None:
        """Remove `handles` and turn the attached modules' X^T X into E[x x^T] = X^T X / n, in place, once
        per shared accumulator (a 1B model's 16 down_proj ones are 4.3 GB), each group's CPU tensor shared
        by its modules (and by one file of a spill)."""
        for h in handles:
            h.remove()
        groups: list[tuple[InputStats, list[str]]] = []
        for name, acc in self._attached.items():
            group = next((names for a, names in groups if a is acc), None)
            if group is None:
                groups.append((acc, [name]))
            else:
                group.append(name)
        for acc, names in groups:
            H = acc.xtx.div_(max(acc.n_tokens, 1)).cpu()
            if self.spill is not None:
                self.spill.put(names, H)
            else:
                self.hessian.update({n: H for n in names})
        self._attached.clear()

    def finish(self, blocks: torch.Tensor, n_tokens: int) -> Sensitivity:
        n_pred = max(1, blocks.shape[0] * (blocks.shape[1] - 1))
        sens = Sensitivity(hessian=self.hessian, n_tokens=n_tokens)
        for name, acc in self.g2.items():
            sens.fisher[name] = (acc / n_pred).float().cpu()
        if self.emb_ids:
            ids = torch.cat(self.emb_ids)
            embed_ids, inverse = torch.unique(ids, return_inverse=True)
            acc = torch.zeros(len(embed_ids), self.d_model, dtype=torch.float64, device=ids.device)
            acc.index_add_(0, inverse, torch.cat(self.emb_g2))
            sens.embed_ids, sens.embed_g2 = embed_ids.cpu(), (acc / n_pred).float().cpu()
        return sens


def collect_sensitivity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 1) -> Sensitivity:
    """Hessians and output Fisher diagonals of every nn.Linear, from calibration blocks [n, seq_len].
    All on the model's device; the returned statistics are float32 CPU tensors (the candidates are
    measured on the host). A model streamed layer by layer: quant.stream.stream_sensitivity."""
    mods = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    emb = model.get_input_embeddings()
    col = Collector(model)

    def emb_hook(mod, inp, out):
        ids = inp[0]

        def grad_hook(g):  # a tensor hook must return None
            col.add_lookups(ids, g)
        out.requires_grad_(True)
        out.register_hook(grad_hook)
        return out

    params = [p for p in model.parameters()]
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    handles = col.attach(mods) + [emb.register_forward_hook(emb_hook)]
    n_tok = 0
    device = emb.weight.device
    try:
        batches = list(blocks.split(batch_size))
        with torch.enable_grad(), progress_bar("calibration (activations, gradients)", total=len(batches)) as adv:
            for b in batches:
                col.seen.clear()
                b = b.to(device)
                next_token_loss_backward(model, b)
                n_tok += b.numel()
                adv()
    finally:
        col.close(handles)
        for p, w in zip(params, was):
            p.requires_grad_(w)
    return col.finish(blocks, n_tok)


# logits computed (and differentiated) at once in the calibration pass: [tokens, vocab] float32 of this size
HEAD_CHUNK_ELEMENTS = 1 << 24


def next_token_loss_backward(model: torch.nn.Module, ids: torch.Tensor) -> None:
    """Backward of the summed next-token cross-entropy of `ids` [b, T]. The head runs on chunks of
    positions (HEAD_CHUNK_ELEMENTS logits each) into the gradient of the final hidden states, then one
    backward through the decoder: the same gradients as the whole-sequence loss, without [b, T, vocab]
    logits and their gradients held at once (6 GB for 8 x 256 tokens of a 262k vocabulary).
    Models without a separate decoder and head (`model.model`, `get_output_embeddings()`) take the plain path."""
    decoder, head = getattr(model, "model", None), model.get_output_embeddings()
    if decoder is None or head is None:
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                          reduction="sum").backward()
        return
    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state  # [b, T, d]
    hidden.backward(head_loss_grad(model, hidden.detach(), ids))


def head_loss_grad(model: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """d(summed next-token cross-entropy of `ids` [b, T]) / d hidden, for the decoder's final hidden
    states hidden [b, T, d] (after its final norm): the LM head runs (with grad, so its hooks see its
    inputs and output gradients) on chunks of positions of HEAD_CHUNK_ELEMENTS logits each."""
    head = model.get_output_embeddings()
    targets = ids[:, 1:]
    h = hidden.detach().requires_grad_(True)
    cap = getattr(model.config, "final_logit_softcapping", None)
    T = ids.shape[1]
    step = max(1, HEAD_CHUNK_ELEMENTS // (ids.shape[0] * head.weight.shape[0]))
    for s in range(0, T, step):  # every position goes through the head (its Hessian counts all T tokens)
        logits = head(h[:, s:s + step]).float()
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        n = min(s + step, T - 1) - s  # positions that predict a next token
        if n <= 0:  # the last position alone: no loss; backward of zero keeps its gradient hooks consistent
            logits.sum().mul(0).backward()
            continue
        torch.nn.functional.cross_entropy(logits[:, :n].reshape(-1, logits.shape[-1]),
                                          targets[:, s:s + n].reshape(-1), reduction="sum").backward()
    return h.grad
