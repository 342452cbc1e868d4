"""End-to-end distillation from the dense teacher, on the teacher's cached top-k logits.

The teacher runs once: for every position of the healing blocks it keeps its k largest logits, their
token ids and the log-sum-exp over the whole vocabulary ([n, seq_len, k] + [n, seq_len]), so full-vocab
teacher logits (vocab up to 262k) are never stored. The loss is the KL divergence between teacher and
student next-token distributions coarsened to k+1 outcomes (the k teacher tokens, everything else):

    KL = sum_{i in top-k} p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest)

with p from the teacher's cached logits and lse, q the student's full softmax. It is exact when the
teacher's top-k hold all its mass and a lower bound of the full KL otherwise. The student's LM head is
applied a few positions at a time, with the backward pass run per chunk (gradients collected on the
final hidden states), so no [tokens, vocab] tensor outlives one chunk. The LM head and embeddings are
frozen; the decoder layers' surviving weights (or norms) train with the pruning mask enforced.

Measured, Gemma 3 270M, Wanda 50%, 8x128 tokens, 10 steps of 2 blocks: lr 3e-5 took held-out ppl
35.48 -> 28.97 (dense 18.48), KL 0.687 -> 0.557, 84 s on one CPU thread; lr 2e-4 diverged (ppl 54).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from birdbone_core.errors import BirdboneError
from birdbone_core.eval.perplexity import head_logits
from birdbone_core.heal import distributed
from birdbone_core.heal.config import Heal
from birdbone_core.heal.train import MaskedAdam, keep_masks, only_these_require_grad, trainable_params
from birdbone_core.model.layers import decoder_layers, final_norm, linear_modules
from birdbone_core.progress import progress_bar
from birdbone_core.runtime import model_device


@dataclass
class TeacherCache:
    values: torch.Tensor    # [n, seq_len, k] float32 top-k logits
    indices: torch.Tensor   # [n, seq_len, k] int64 token ids
    lse: torch.Tensor       # [n, seq_len] float32 log-sum-exp over the full vocabulary


@dataclass
class DistillReport:
    method: str
    trainable: str
    steps: int
    lr: float
    top_k: int
    kl_before: float        # mean top-k KL(teacher || student) per position on the healing blocks
    kl_after: float
    curve: list[float] = field(default_factory=list)
    n_trained: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


_head = head_logits  # one LM-head definition for evaluation and distillation


def _final_hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    """[b, s, d] final hidden states; the token ids [b, s] (cached on the host) move to the model's device."""
    return model.get_decoder()(input_ids=input_ids.to(model_device(model)), use_cache=False).last_hidden_state


@torch.no_grad()
def teacher_topk(teacher, blocks: torch.Tensor, k: int, batch_size: int = 8, head_chunk: int = 128,
                 description: str = "teacher logits") -> TeacherCache:
    """Top-k logits, their ids and the full log-sum-exp at every position of `blocks` [n, seq_len]."""
    n, s = blocks.shape
    vocab = teacher.get_output_embeddings().weight.shape[0]
    k = min(k, vocab)
    values = torch.empty(n, s, k)
    indices = torch.empty(n, s, k, dtype=torch.long)
    lse = torch.empty(n, s)
    with progress_bar(description, total=n) as advance:
        for start in range(0, n, batch_size):
            ids = blocks[start : start + batch_size]
            h = _final_hidden(teacher, ids)
            h = h.reshape(-1, h.shape[-1])
            v_parts, i_parts, l_parts = [], [], []
            for c in range(0, h.shape[0], head_chunk):
                logits = _head(teacher, h[c : c + head_chunk])
                v, i = logits.topk(k, dim=-1)
                v_parts.append(v.cpu())
                i_parts.append(i.cpu())
                l_parts.append(torch.logsumexp(logits, -1).cpu())
            b = ids.shape[0]
            values[start : start + b] = torch.cat(v_parts).reshape(b, s, k)
            indices[start : start + b] = torch.cat(i_parts).reshape(b, s, k)
            lse[start : start + b] = torch.cat(l_parts).reshape(b, s)
            advance(b)
    return TeacherCache(values, indices, lse)


def restrict_cache(cache: TeacherCache, kept: list[int], n_vocab: int) -> TeacherCache:
    """The cache for a student whose vocabulary is the teacher's ids `kept` (ascending; student id i is
    teacher id kept[i]): indices renumbered; a top-k token the student lacks gets logit -inf, so its teacher
    mass joins the "rest" outcome (which the student's remaining tokens carry)."""
    to_student = torch.full((n_vocab,), -1, dtype=torch.long)
    to_student[torch.tensor(kept, dtype=torch.long)] = torch.arange(len(kept))
    idx = to_student[cache.indices]
    values = cache.values.masked_fill(idx < 0, float("-inf"))
    return TeacherCache(values, idx.clamp_min(0), cache.lse)


def topk_kl(student_logits: torch.Tensor, t_values: torch.Tensor, t_indices: torch.Tensor,
            t_lse: torch.Tensor) -> torch.Tensor:
    """Per-position KL(teacher || student) over {top-k tokens, rest}. Shapes [t, V], [t, k], [t, k], [t]."""
    logq_all = torch.log_softmax(student_logits.float(), dim=-1)
    logq = logq_all.gather(1, t_indices.to(student_logits.device))                # [t, k]
    logp = t_values.to(logq) - t_lse.to(logq)[:, None]                            # [t, k]
    valid = torch.isfinite(logp)          # -inf: a teacher token the student lacks (restrict_cache)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    p = torch.where(valid, logp.exp(), torch.zeros_like(logp))
    kl = (p * (logp - logq)).sum(-1)
    # the rest: teacher mass outside its top-k, student mass outside the same tokens
    p_rest = (1.0 - p.sum(-1)).clamp_min(0.0)
    q_rest = (1.0 - (logq.exp() * valid).sum(-1)).clamp_min(1e-12)
    rest = torch.where(p_rest > 1e-12, p_rest * (p_rest.clamp_min(1e-12).log() - q_rest.log()),
                       torch.zeros_like(p_rest))
    return kl + rest


def _kl_backward(model, h: torch.Tensor, cache: TeacherCache, rows: torch.Tensor, head_chunk: int,
                 scale: float, backward: bool) -> float:
    """Sum of top-k KL over all positions of h [b, s, d] (teacher rows `rows`); with backward, the
    gradient of scale*sum flows into the model through h, one LM-head chunk at a time."""
    b, s, d = h.shape
    flat = h.reshape(-1, d)
    leaf = flat.detach().requires_grad_(backward)
    tv = cache.values[rows].reshape(b * s, -1)
    ti = cache.indices[rows].reshape(b * s, -1)
    tl = cache.lse[rows].reshape(b * s)
    total = 0.0
    for c in range(0, b * s, head_chunk):
        sl = slice(c, c + head_chunk)
        with torch.set_grad_enabled(backward):
            kl = topk_kl(_head(model, leaf[sl]), tv[sl], ti[sl], tl[sl]).sum()
            if backward:
                (kl * scale).backward()
        total += kl.item()
    if backward:
        flat.backward(leaf.grad)
    return total


@torch.no_grad()
def mean_topk_kl(model, blocks: torch.Tensor, cache: TeacherCache, batch_size: int = 8,
                 head_chunk: int = 128) -> float:
    """Mean top-k KL(teacher || model) per position over `blocks`."""
    total = 0.0
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start : start + batch_size]
        rows = torch.arange(start, start + ids.shape[0])
        total += _kl_backward(model, _final_hidden(model, ids), cache, rows, head_chunk, 1.0, False)
    return total / blocks.numel()


def distill_params(model, trainable: str):
    """(name, param, mask) over every decoder layer; masks from the current zeros of linear weights."""
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        out += trainable_params(layer, trainable, keep_masks(layer), prefix=f"layers.{i}.")
    if trainable == "norms":
        norm = final_norm(model)
        out += [("norm." + n, p, None) for n, p in norm.named_parameters()]
    return out


def heal_distill(model, teacher, blocks: torch.Tensor, cfg: Heal, *, steps: int | None = None,
                 lr: float | None = None, head_chunk: int = 128, cache: TeacherCache | None = None,
                 description: str = "distilling") -> DistillReport:
    """Distil `teacher` (dense) into `model` (pruned, in place) on `blocks` [n, seq_len].

    Each step: a random minibatch of cfg.batch_size blocks, loss = mean top-k KL over its positions.
    A precomputed `cache` (from teacher_topk on the same blocks) may be passed to skip the teacher run.
    """
    t0 = time.perf_counter()
    steps = cfg.steps if steps is None else steps
    lr = cfg.base_lr if lr is None else lr
    if cache is None:
        cache = teacher_topk(teacher, blocks, cfg.top_k, cfg.batch_size, head_chunk)
    if min(cfg.batch_size, blocks.shape[0]) < distributed.world_size():
        raise BirdboneError(f"distill: minibatches of {min(cfg.batch_size, blocks.shape[0])} samples cannot "
                            f"be split over {distributed.world_size()} processes")
    kl0 = mean_topk_kl(model, blocks, cache, cfg.batch_size, head_chunk)
    session = None
    if cfg.trainable in ("lora", "qlora") and steps > 0:
        from birdbone_core.heal.lora import LoraSession
        names = {m: n for n, m in model.named_modules()}
        mods, masks = {}, {}
        for layer in decoder_layers(model):
            keep = keep_masks(layer)
            for rel, mod in linear_modules(layer).items():
                mods[names[mod]] = mod
                if rel in keep:
                    masks[names[mod]] = keep[rel]
        session = LoraSession(model, mods, masks, cfg.lora, quantize=cfg.trainable == "qlora",
                              seed=0 if cfg.seed is None else cfg.seed)
        params = [(f"adapter.{i}", p, None) for i, p in enumerate(session.parameters())]
    else:
        params = distill_params(model, cfg.trainable) if cfg.trainable not in ("lora", "qlora") else []
    report = DistillReport(
        method="distill", trainable=cfg.trainable, steps=steps, lr=lr, top_k=cache.values.shape[-1],
        kl_before=kl0, kl_after=kl0,
        n_trained=sum(int(k.sum()) if k is not None else p.numel() for _, p, k in params),
    )
    if steps <= 0 or not params:
        report.seconds = time.perf_counter() - t0
        return report

    gen = torch.Generator().manual_seed(0 if cfg.seed is None else cfg.seed)
    n = blocks.shape[0]
    bs = min(cfg.batch_size, n)
    order: list[int] = []
    was_training = model.training
    model.eval()  # no dropout: the student should match the teacher's deterministic forward
    try:
        with only_these_require_grad(model, [p for _, p, _ in params]), \
                progress_bar(description, total=steps) as advance:
            # under torchrun: every decoder layer an FSDP unit, the decoder the root unit (forward runs
            # through get_decoder()); the LM head and embeddings are frozen and stay out of FSDP
            engine = distributed.Sharded(model, [(p, k) for _, p, k in params],
                                         [*decoder_layers(model), model.get_decoder()])
            opt = MaskedAdam(engine.items, lr, steps, cfg.weight_decay, cfg.schedule)
            for _ in range(steps):
                if len(order) < bs:
                    order += torch.randperm(n, generator=gen).tolist()
                rows = torch.tensor(order[:bs])
                del order[:bs]
                n_global = rows.numel() * blocks.shape[1]     # positions of the global minibatch
                rows = distributed.shard(rows)                # this rank's part (all of it alone)
                h = _final_hidden(engine.module, blocks[rows])
                total = _kl_backward(engine.module, h, cache, rows, head_chunk, 1.0 / n_global, True)
                report.curve.append(distributed.all_reduce_sum([total])[0] / n_global)
                opt.step()
                advance()
            engine.write_back()
    except BaseException:
        if session is not None:
            session.abort()
        raise
    finally:
        model.train(was_training)
    if session is not None:
        session.merge()
    report.kl_after = mean_topk_kl(model, blocks, cache, cfg.batch_size, head_chunk)
    report.seconds = time.perf_counter() - t0
    return report
