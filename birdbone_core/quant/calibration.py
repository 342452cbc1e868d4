"""Calibration statistics for the quantizer: one forward + backward pass over calibration blocks gives,
for every linear module, H = E[x x^T] of its inputs and F = E[g^2] per output channel (g = dLoss/d output,
the next-token cross-entropy), and for the token embedding the per-row E[|g|^2] of its lookups.

    collect_sensitivity(model, blocks [n, seq_len], batch_size) -> Sensitivity
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from birdbone_core.model.walk import InputStats, attach_stats
from birdbone_core.progress import progress_bar


@dataclass
class Sensitivity:
    hessian: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> E[x x^T] [in, in]
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> E[g^2] [out]
    # the embedding's lookups: for each row v seen in calibration, the per-dimension E over tokens of
    # (dL/dE_v)^2 (zero for tokens that are not v); rows never looked up carry no lookup term
    embed_ids: torch.Tensor | None = None  # [m] int64 rows seen
    embed_g2: torch.Tensor | None = None  # [m, d] float32
    n_tokens: int = 0


def collect_sensitivity(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 1) -> Sensitivity:
    """Hessians and output Fisher diagonals of every nn.Linear, from calibration blocks [n, seq_len].
    X^T X comes from the layer walk's collector (`model.walk.attach_stats`, float32; q/k/v and gate/up
    share one); the gradient statistics accumulate in float64. All on the model's device; the returned
    statistics are float32 CPU tensors (the candidates are measured on the host)."""
    g2: dict[str, torch.Tensor] = {}
    mods = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    emb = model.get_input_embeddings()
    scale = float(getattr(emb, "scalar_embed_scale", 1.0) or 1.0)  # Gemma scales lookups by sqrt(d)
    emb_ids: list[torch.Tensor] = []
    emb_g2: list[torch.Tensor] = []
    stats, seen, stat_handles = attach_stats(mods, full=True)

    def fwd(name):
        def hook(mod, inp, out):
            if out.requires_grad:
                out.register_hook(lambda g: _add_g2(name, g))
        return hook

    def _add_g2(name, g):
        s = (g.detach().double() ** 2).reshape(-1, g.shape[-1]).sum(0)
        g2[name] = g2[name] + s if name in g2 else s

    def emb_hook(mod, inp, out):
        ids = inp[0].reshape(-1)
        def grad_hook(g):  # a tensor hook must return None
            emb_ids.append(ids.clone())
            emb_g2.append((g.detach().double() ** 2).reshape(len(ids), -1) * scale ** 2)
        out.register_hook(grad_hook)

    params = [p for p in model.parameters()]
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    handles = stat_handles + [m.register_forward_hook(fwd(n)) for n, m in mods.items()]
    handles.append(emb.register_forward_hook(lambda m, i, o: (o.requires_grad_(True), emb_hook(m, i, o))[0]))
    n_tok = 0
    device = emb.weight.device
    try:
        batches = list(blocks.split(batch_size))
        with torch.enable_grad(), progress_bar("calibration (activations, gradients)", total=len(batches)) as adv:
            for b in batches:
                seen.clear()
                b = b.to(device)
                next_token_loss_backward(model, b)
                n_tok += b.numel()
                adv()
    finally:
        for h in handles:
            h.remove()
        for p, w in zip(params, was):
            p.requires_grad_(w)
    n_pred = max(1, blocks.shape[0] * (blocks.shape[1] - 1))
    sens = Sensitivity(n_tokens=n_tok)
    # E[x x^T] = X^T X / n in place, once per shared accumulator (a 1B model's 16 down_proj ones are
    # 4.3 GB), each group's CPU tensor shared by its modules
    host: list[tuple[InputStats, torch.Tensor]] = []
    for name, acc in stats.items():
        H = next((h for a, h in host if a is acc), None)
        if H is None:
            H = acc.xtx.div_(max(acc.n_tokens, 1)).cpu()
            host.append((acc, H))
        sens.hessian[name] = H
    stats.clear()
    for name, acc in g2.items():
        sens.fisher[name] = (acc / n_pred).float().cpu()
    if emb_ids:
        ids = torch.cat(emb_ids)
        embed_ids, inverse = torch.unique(ids, return_inverse=True)
        acc = torch.zeros(len(embed_ids), emb.weight.shape[1], dtype=torch.float64, device=ids.device)
        acc.index_add_(0, inverse, torch.cat(emb_g2))
        sens.embed_ids, sens.embed_g2 = embed_ids.cpu(), (acc / n_pred).float().cpu()
    return sens


# logits computed (and differentiated) at once in the calibration pass: [tokens, vocab] float32 of this size
HEAD_CHUNK_ELEMENTS = 1 << 24


def next_token_loss_backward(model: torch.nn.Module, ids: torch.Tensor) -> None:
    """Backward of the summed next-token cross-entropy of `ids` [b, T]. The head runs on chunks of
    positions (HEAD_CHUNK_ELEMENTS logits each) into the gradient of the final hidden states, then one
    backward through the decoder: the same gradients as the whole-sequence loss, without [b, T, vocab]
    logits and their gradients held at once (6 GB for 8 x 256 tokens of a 262k vocabulary).
    Models without a separate decoder and head (`model.model`, `get_output_embeddings()`) take the plain path."""
    decoder, head = getattr(model, "model", None), model.get_output_embeddings()
    targets = ids[:, 1:]
    if decoder is None or head is None:
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                          reduction="sum").backward()
        return
    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state  # [b, T, d]
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
    hidden.backward(h.grad)
