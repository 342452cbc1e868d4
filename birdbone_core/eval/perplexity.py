"""Perplexity, KL divergence and top-1 agreement, following llama.cpp's `llama-perplexity` protocol so
torch numbers and llama.cpp numbers can be compared one for one:

    chunks [n_chunks, n_ctx] (first token = BOS), logits at positions j in [n_ctx/2, n_ctx-1)
    predict tokens j+1: n_ctx/2 - 1 scored tokens per chunk.

The LM head is applied to a few positions at a time (`head_chunk`), so a 262k vocabulary never
materialises [n_ctx, vocab] logits. KL divergence is KL(reference || model) per token, as llama.cpp's
--kl-divergence reports it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from birdbone_core.errors import BirdboneError
from birdbone_core.progress import progress_bar


@dataclass
class EvalResult:
    ppl: float
    nll: float             # mean negative log-likelihood per scored token (nats)
    n_scored: int
    n_chunks: int
    n_ctx: int
    kld: float | None = None        # mean KL(reference || model), nats
    top1: float | None = None       # fraction of positions where argmax agrees with the reference

    def as_dict(self) -> dict:
        return asdict(self)


def _first(n_ctx: int) -> int:
    return n_ctx // 2


@torch.no_grad()
def check_n_ctx(model, n_ctx: int) -> None:
    """Refuse chunks longer than the model's context (they would run far slower and score nonsense)."""
    check_context(n_ctx, getattr(model.config, "max_position_embeddings", None))


def check_context(n_ctx: int, limit: int | None) -> None:
    if limit is not None and n_ctx > limit:
        raise BirdboneError(f"n_ctx={n_ctx} is longer than the model's context ({limit} tokens); "
                            f"choose n_ctx <= {limit}")


def scored_hidden_states(model, chunks: torch.Tensor, description: str = "evaluating") -> torch.Tensor:
    """Final (normed) hidden states at the scored positions.

    chunks: [n_chunks, n_ctx] -> [n_chunks, n_ctx - 1 - n_ctx/2, d_model] float32, on the CPU (what the
    baseline saves; score_hidden moves slices back to the model's device).
    """
    n_chunks, n_ctx = chunks.shape
    check_n_ctx(model, n_ctx)
    first = _first(n_ctx)
    base = model.get_decoder()
    device = model.get_input_embeddings().weight.device
    out = []
    with progress_bar(description, total=n_chunks) as advance:
        for c in range(n_chunks):
            h = base(input_ids=chunks[c : c + 1].to(device), use_cache=False).last_hidden_state  # [1, n_ctx, d]
            out.append(h[0, first : n_ctx - 1].float().cpu())
            advance()
    return torch.stack(out)


@torch.no_grad()
def streamed_hidden_states(sm, chunks: torch.Tensor, description: str = "evaluating") -> torch.Tensor:
    """scored_hidden_states for a model streamed layer by layer (birdbone_core.model.stream.StreamedModel):
    every chunk goes through layer i before layer i+1 is read, so only one layer is ever in memory beside
    the chunks' hidden states ([n_chunks, n_ctx, d_model]). The same layers on the same inputs: the same
    states as the whole model's forward. Layers are released again as they are done."""
    from birdbone_core.model.layers import decoder_layers, final_norm
    from birdbone_core.model.walk import capture_layer_inputs, layer_out

    n_chunks, n_ctx = chunks.shape
    check_n_ctx(sm.model, n_ctx)
    first = _first(n_ctx)
    hidden, kwargs = capture_layer_inputs(sm.model, chunks, 1)        # per chunk: [1, n_ctx, d]
    with progress_bar(description, total=sm.n_layers) as advance:
        for i, layer in enumerate(decoder_layers(sm.model)):
            sm.load_layer(i)
            for c, h in enumerate(hidden):
                hidden[c] = layer_out(layer, h, kwargs[i][c])
            sm.release_layer(i)
            advance()
    norm = final_norm(sm.model)
    return torch.stack([norm(h)[0, first : n_ctx - 1].float().cpu() for h in hidden])


def head_logits(model, h: torch.Tensor) -> torch.Tensor:
    """LM head (+ final soft-capping where the architecture has it). h: [t, d] (any device) -> [t, vocab]
    float32 on the head's device."""
    head = model.get_output_embeddings()
    logits = head(h.to(device=head.weight.device, dtype=model.dtype)).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def score_hidden(
    model,
    hidden: torch.Tensor,
    chunks: torch.Tensor,
    reference_hidden: torch.Tensor | None = None,
    head_chunk: int = 64,
) -> EvalResult:
    """Score scored-position hidden states [n_chunks, t, d] against the chunks' next tokens.

    With reference_hidden (same shape, from the uncompressed model), also KL and top-1 agreement;
    both sides go through this model's LM head, which compression leaves untouched. Log-probs and KL are
    computed in float64 on the head's device.
    """
    n_chunks, n_ctx = chunks.shape
    first = _first(n_ctx)
    targets = chunks[:, first + 1 : n_ctx]                       # [n_chunks, t]
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1)
    ref = reference_hidden.reshape(-1, hidden.shape[-1]) if reference_hidden is not None else None
    nll_sum = 0.0
    kld_sum = 0.0
    agree = 0
    for s in range(0, h.shape[0], head_chunk):
        logp = torch.log_softmax(head_logits(model, h[s : s + head_chunk]), dim=-1).double()
        nll_sum += -logp.gather(1, y[s : s + head_chunk, None].to(logp.device)).sum().item()
        if ref is not None:
            ref_logp = torch.log_softmax(head_logits(model, ref[s : s + head_chunk]), dim=-1).double()
            kld_sum += (ref_logp.exp() * (ref_logp - logp)).sum().item()
            agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
    n = h.shape[0]
    nll = nll_sum / n
    return EvalResult(
        ppl=math.exp(nll) if nll < 709 else math.inf,                     # exp overflows a float past ~709
        nll=nll, n_scored=n, n_chunks=n_chunks, n_ctx=n_ctx,
        kld=kld_sum / n if ref is not None else None,
        top1=agree / n if ref is not None else None,
    )


def evaluate(model, chunks: torch.Tensor, reference_hidden: torch.Tensor | None = None,
             description: str = "evaluating") -> tuple[EvalResult, torch.Tensor]:
    """Perplexity (and KL/top-1 when a reference is given). Returns (result, this model's hidden states)."""
    hidden = scored_hidden_states(model, chunks, description)
    return score_hidden(model, hidden, chunks, reference_hidden), hidden


@torch.no_grad()
def bits_per_byte(model, tokenizer, text: str, *, segment_bytes: int = 2048, max_segments: int = 8,
                  head_chunk: int = 128) -> dict:
    """Bits per byte of held-out text in torch, comparable across tokenizers (the protocol of
    birdbone_core.eval.llamacpp.llama_bits_per_byte): each segment (data.text.text_segments) is tokenized by
    `tokenizer` with BOS and every token of it is scored; total NLL in bits over the segments' UTF-8 bytes."""
    from birdbone_core.data.text import text_segments
    from birdbone_core.runtime import model_device

    segments = text_segments(text, segment_bytes, max_segments)
    if not segments:
        raise BirdboneError(f"bits per byte needs at least {segment_bytes} bytes of text")
    nll, n_tok = 0.0, 0
    for seg in segments:
        ids = torch.tensor([tokenizer(seg, add_special_tokens=True)["input_ids"]], device=model_device(model))
        h = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]   # [t-1, d]
        targets = ids[0, 1:]
        for c in range(0, h.shape[0], head_chunk):
            logp = torch.log_softmax(head_logits(model, h[c:c + head_chunk]), -1)
            nll -= float(logp.gather(1, targets[c:c + head_chunk, None].to(logp.device)).sum())
        n_tok += targets.numel()
    n_bytes = sum(len(s.encode("utf-8")) for s in segments)
    return {"bits_per_byte": nll / math.log(2) / n_bytes, "bytes": n_bytes, "tokens": n_tok, "segments": len(segments)}
