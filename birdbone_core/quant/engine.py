"""Plumbing: from a model and calibration blocks to one packed GGUF type per tensor, under a budget.

1. One forward + backward pass over calibration blocks (`quant.calibration.collect_sensitivity`): for every linear
   module, H = E[x x^T] of its inputs and F = E[g^2] per output channel (g = dLoss/d output, the
   next-token cross-entropy); for the token embedding, per-row E[|g|^2] of its lookups.
2. A survey of every type on a sample of each tensor's rows narrows the types to a shortlist around the
   budget's pick (`quant.survey`, `quantize.shortlist`). For every 2-D weight and every shortlisted type:
   grid-aware GPTQ (kept only where it beats the codec's
   own importance-weighted rounding), and its sensitivity = sum_rows F_row * (dW H dW^T)_row,row
   (+ the embedding's lookup term), a K-FAC-style estimate of the loss increase, times `stress`.
   A tensor whose weights are exactly its GGUF source's dequantized blocks has those blocks as an extra,
   error-free candidate of the source type (`quant.source`), so re-quantizing a GGUF never compounds
   rounding error where the type stays.
3. `budget.allocate` picks one type per tensor; the packed bytes go to `export_gguf(quantized=...)`.
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from birdbone_core.errors import BirdboneError
from birdbone_core.export.arch import arch_for, model_dims, permute_for_rope, plan_tensors
from birdbone_core.progress import progress_bar
from birdbone_core.quant import budget as budget_mod
from birdbone_core.quant.calibration import Sensitivity
from birdbone_core.quant.codecs import encode_torch
from birdbone_core.quant.config import Quantize
from birdbone_core.quant.error import encoded_loss
from birdbone_core.quant.formats import can_apply, get_format
from birdbone_core.quant.gptq import GPTQSettings, gptq_quantize_many
from birdbone_core.quant.importance import Imatrix
from birdbone_core.runtime import model_device, release_freed_memory

# A tensor holding at least this share of the budgeted weights keeps both of its encodings per type
# (GPTQ's and plain rounding's): the estimate ranks them, quant.trials measures them.
ALTERNATE_SHARE = 0.25


@dataclass
class QuantResult:
    quantized: dict[str, tuple[str, np.ndarray]]  # gguf name -> (type, packed bytes)
    types: dict[str, str]  # every tensor, 1-D included
    n_bytes: int  # tensor data bytes
    n_weights: int
    budget_bytes: int
    errors: dict[str, dict[str, float]]  # gguf name -> type -> sensitivity
    gptq_won: dict[str, dict[str, bool]]
    seconds: float
    kept_source: list[str] = field(default_factory=list)  # tensors written with the source GGUF's own blocks
    trials: list = field(default_factory=list)  # quant.trials.Trial: allocations scored by measured KL

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.n_bytes / max(self.n_weights, 1)


def _module_of(hf_name: str) -> str:
    return hf_name[: -len(".weight")] if hf_name.endswith(".weight") else hf_name


def _pad_to(v: torch.Tensor, n: int) -> torch.Tensor:
    return v if v.shape[0] == n else torch.cat([v, v.new_zeros(n - v.shape[0])])


@dataclass
class Candidates:
    """Every allowed encoding of every 2-D weight, with its size and measured sensitivity."""
    options: dict[str, dict[str, tuple[int, float]]]  # gguf name -> type -> (bytes, sensitivity)
    packed: dict[str, dict[str, np.ndarray]]
    fixed: dict[str, tuple[str, np.ndarray | None]]  # tensors not under the budget: 1-D F32, float 2-D
    fixed_bytes: int
    n_weights: int
    gptq_won: dict[str, dict[str, bool]]
    seconds: float
    from_source: dict[str, str] = field(default_factory=dict)  # gguf name -> type whose candidate is the source's
    # big tensors (>= ALTERNATE_SHARE of the budgeted weights): the encoding the estimate ranked second
    # (GPTQ or plain rounding) per type, with its estimate, for quant.trials to measure
    alternates: dict[str, dict[str, tuple[np.ndarray, float]]] = field(default_factory=dict)


def quantize_model(model: torch.nn.Module, cfg: Quantize, sens: Sensitivity | None,
                   imatrix: Imatrix | None = None, source_gguf=None) -> QuantResult:
    """Choose and encode one type per 2-D weight of `model` (GGUF names, llama.cpp's layouts).
    source_gguf: the GGUF the model was loaded from (its unchanged tensors keep their blocks)."""
    check_budget(model, cfg)
    cands = measure_candidates(model, cfg, sens, imatrix, source_gguf)
    total = budget_bytes(cfg, cands.n_weights)
    return choose(cands, total)


def budget_bytes(cfg: Quantize, n_weights: int) -> int:
    """Bytes of tensor data the recipe allows: target_bytes, or target_bpw over all `n_weights`."""
    return cfg.target_bytes if cfg.target_bytes is not None else int(math.floor(cfg.target_bpw * n_weights / 8))


def choose(c: Candidates, total_budget: int) -> QuantResult:
    """Pick one candidate per tensor so that all tensor data fits `total_budget` bytes."""
    t0 = time.time()
    alloc = budget_mod.allocate(c.options, total_budget - c.fixed_bytes)
    quantized = {name: (t, c.packed[name][t]) for name, t in alloc.choice.items()}
    types = {name: t for name, (t, _) in c.fixed.items()}
    for name, (t, data) in c.fixed.items():
        if data is not None:
            quantized[name] = (t, data)
    types.update(alloc.choice)
    errors = {name: {t: e for t, (_, e) in opts.items()} for name, opts in c.options.items()}
    kept = sorted(n for n, t in alloc.choice.items() if c.from_source.get(n) == t)
    return QuantResult(quantized, types, c.fixed_bytes + alloc.n_bytes, c.n_weights, total_budget, errors,
                       c.gptq_won, c.seconds + time.time() - t0, kept)


def check_budget(model: torch.nn.Module, cfg: Quantize, state: Mapping[str, torch.Tensor] | None = None) -> None:
    """Fail fast (before calibration and encoding) when even the smallest allowed types exceed the budget.
    state: the model's tensors when they are not in `model` (export_gguf's `state`)."""
    plans, todo, fixed_types, n_weights = _plan(model, cfg, state)
    smallest = sum(min(get_format(t).n_bytes(int(np.prod(p.shape))) for t in types) for p, types in todo)
    smallest += sum(get_format(fixed_types[p.gguf_name]).n_bytes(int(np.prod(p.shape)))
                    for p in plans if p.gguf_name in fixed_types)
    if cfg.target_bpw is None and cfg.target_bytes is None:
        raise BirdboneError("quantize: give target_bpw or target_bytes")
    total = budget_bytes(cfg, n_weights)
    if smallest > total:
        raise BirdboneError(f"bit budget of {total} bytes is below the smallest possible size "
                            f"({smallest} bytes with the allowed types)")


def _plan(model: torch.nn.Module, cfg: Quantize, state: Mapping[str, torch.Tensor] | None = None):
    """(tensor plans, [(plan, candidate types)] for the budget, {name: fixed type}, total weights)."""
    config = model.config
    spec = arch_for(config)
    state = model.state_dict() if state is None else state
    dims = model_dims(config, state)
    plans = plan_tensors(model, spec, dims, config, state)
    fixed_types: dict[str, str] = {}
    n_weights = 0
    todo = []
    for p in plans:
        n = int(np.prod(p.shape))
        n_weights += n
        if len(p.shape) < 2:
            fixed_types[p.gguf_name] = "F32"
            continue
        forced = cfg.override_for(p.gguf_name)
        types = [forced] if forced else [t for t in cfg.types if can_apply(t, p.shape[-1])]
        if forced and forced not in ("F16", "F32") and not can_apply(forced, p.shape[-1]):
            raise BirdboneError(f"override {forced} for {p.gguf_name}: rows of {p.shape[-1]} are not whole blocks")
        if not types:
            types = ["F16"]  # no allowed block type fits these rows
        if types[0] in ("F16", "F32"):
            fixed_types[p.gguf_name] = types[0]
            continue
        todo.append((p, types))
    return plans, todo, fixed_types, n_weights


def measure_candidates(model: torch.nn.Module, cfg: Quantize, sens: Sensitivity | None,
                       imatrix: Imatrix | None = None, source_gguf=None, cache: dict | None = None,
                       state: Mapping[str, torch.Tensor] | None = None, device: torch.device | None = None,
                       spill=None) -> Candidates:
    """Encode every 2-D weight in its candidate types (GPTQ where statistics exist) and measure each.
    With `cfg.shortlist` set, a survey (`quant.survey`) first narrows each tensor's types to those the
    budget could pick. cache: a dict kept between calls on the same model and statistics (a benchmark
    trying several budgets); it holds the survey's estimates and every full encoding made. state: the
    model's tensors when they are not in `model` (a streamed model: each is read when its turn comes);
    device: where GPTQ runs (default: the model's). spill(packed) -> the array to keep instead (e.g.
    quant.stream.SpilledArrays: a copy on disk, mapped), applied to every encoding as it is made."""
    keep = spill or (lambda a: a)
    t0 = time.time()
    cache = {} if cache is None else cache
    plans, todo, fixed_types, n_weights = _plan(model, cfg, state)
    source: dict[str, tuple[str, np.ndarray]] = {}
    if source_gguf is not None and cfg.keep_source:
        from birdbone_core.quant.source import source_blocks

        source = source_blocks(source_gguf, plans, {p.gguf_name: types for p, types in todo})
    stats = _Statistics(model, plans, cfg, sens, imatrix, state)
    settings = GPTQSettings(block_size=cfg.gptq.block_size, damp=cfg.gptq.damp, act_order=cfg.gptq.act_order,
                            static_scales=cfg.gptq.static_scales)
    budgeted = sum(int(np.prod(p.shape)) for p, _ in todo)
    fixed, fixed_bytes = _fixed(plans, fixed_types)
    device = device or model_device(model)     # where GPTQ's column loops run
    if cfg.shortlist is not None and len(todo) > 0:
        todo = _shortlisted(todo, stats, cfg, settings, source, cache, budget_bytes(cfg, n_weights) - fixed_bytes,
                            budgeted, device)
    options: dict[str, dict[str, tuple[int, float]]] = {}
    candidates: dict[str, dict[str, np.ndarray]] = {}
    alternates: dict[str, dict[str, tuple[np.ndarray, float]]] = {}
    won: dict[str, dict[str, bool]] = {}
    with progress_bar("quantizing tensors", total=sum(len(t) for _, t in todo)) as advance:
        for p, types in todo:
            name = p.gguf_name
            options[name], candidates[name], won[name] = {}, {}, {}
            src_type = source.get(name, (None,))[0]
            missing = [t for t in types if (name, t) not in cache and t != src_type]
            if missing:
                W, H, F, emb_rows, imp = stats.of(p)
                rows, cols = W.shape
                gptq = {}
                if H is not None and cfg.gptq.applies_to(name):  # every format in one column pass
                    # the column loop on the model's device (float32; results come back as host bytes)
                    gptq = gptq_quantize_many(W.to(device), H.to(device), missing, settings,
                                              importance=(imp if imp is not None else torch.ones(cols)).to(device))
                for t in missing:
                    if t in gptq:
                        r = gptq.pop(t)
                        e_g = encoded_loss(t, r.packed, W, H, F, emb_rows)
                        e_p = encoded_loss(t, r.plain_packed, W, H, F, emb_rows)
                        first, other = (r.packed, e_g), (r.plain_packed, e_p)
                        if e_p < e_g:
                            first, other = other, first
                        big = rows * cols >= ALTERNATE_SHARE * budgeted  # the measured choice will try both
                        cache[name, t] = (first[1], keep(first[0]), first[0] is r.packed,
                                          (keep(other[0]), other[1]) if big else None)
                        del r, first, other
                    else:
                        pk = encode_torch(t, W, imp)[0].numpy()
                        cache[name, t] = (encoded_loss(t, pk, W, H, F, emb_rows), keep(pk), False, None)
                del W, H, F, emb_rows, imp, gptq
                release_freed_memory(collect=False)     # each tensor's temporaries differ in size: trim
            for t in types:
                fmt = get_format(t)
                n_bytes = fmt.n_bytes(int(np.prod(p.shape)))
                if src_type == t:   # the source's own blocks: exact, zero error
                    options[name][t] = (n_bytes, 0.0)
                    candidates[name][t] = source[name][1]
                    advance()
                    continue
                err, packed, gptq_won, other = cache[name, t]
                stress = cfg.stress_for(name)
                if other is not None:
                    alternates.setdefault(name, {})[t] = (other[0], other[1] * stress)
                if cfg.gptq.applies_to(name) and stats.has_hessian(p):
                    won[name][t] = gptq_won
                options[name][t] = (n_bytes, err * stress)
                candidates[name][t] = packed
                advance()
    return Candidates(options, candidates, fixed, fixed_bytes, n_weights, won, time.time() - t0,
                      {n: t for n, (t, _) in source.items()}, alternates)


def _fixed(plans, fixed_types: dict[str, str]) -> tuple[dict[str, tuple[str, np.ndarray | None]], int]:
    """Tensors outside the budget: (name -> (type, data for 2-D tensors kept in float)), their bytes."""
    fixed: dict[str, tuple[str, np.ndarray | None]] = {}
    fixed_bytes = 0
    for pl in plans:
        t = fixed_types.get(pl.gguf_name)
        if t is None:
            continue
        fixed_bytes += get_format(t).n_bytes(int(np.prod(pl.shape)))
        # 2-D tensors kept in float (overrides, or no block type fits their rows) go in as data
        data = pl.load().astype(np.float16 if t == "F16" else np.float32) if len(pl.shape) >= 2 else None
        fixed[pl.gguf_name] = (t, data)
    return fixed, fixed_bytes


def _shortlisted(todo, stats: "_Statistics", cfg: Quantize, settings: GPTQSettings, source, cache: dict, budget: int,
                 budgeted: int, device: torch.device):
    """todo with each tensor's types narrowed to its shortlist (quant.survey)."""
    from birdbone_core.quant.survey import shortlist, survey_errors

    estimates: dict[str, dict[str, tuple[int, float]]] = {}
    with progress_bar("survey (sampled rows, every type)", total=len(todo)) as advance:
        for p, types in todo:
            name = p.gguf_name
            src_type = source.get(name, (None,))[0]
            surveyed = [t for t in types if t != src_type]  # the source's own type is exact: nothing to estimate
            if ("survey", name) not in cache:
                cache["survey", name] = {}
                if surveyed:
                    W, H, F, emb_rows, imp = stats.of(p)
                    cache["survey", name] = survey_errors(W, surveyed, H, F, emb_rows, imp,
                                                          settings if cfg.gptq.applies_to(name) else None, device)
            n = int(np.prod(p.shape))
            estimates[name] = {t: (get_format(t).n_bytes(n), 0.0 if t == src_type else
                                   cache["survey", name][t] * cfg.stress_for(name)) for t in types}
            advance()
    wide = {p.gguf_name for p, _ in todo if int(np.prod(p.shape)) >= ALTERNATE_SHARE * budgeted}
    keep = shortlist(estimates, budget, cfg.shortlist, wide)
    return [(p, [t for t in types if t in keep[p.gguf_name]]) for p, types in todo]


class _Statistics:
    """Per-tensor calibration statistics in the exported layout: W [rows, cols] float32 (GGUF rows), its
    Hessian H [cols, cols], output Fisher F [rows] (q/k rows permuted as the export permutes them), the
    embedding's lookup rows, and the importance the codecs weigh columns by."""

    def __init__(self, model, plans, cfg: Quantize, sens: Sensitivity | None, imatrix: Imatrix | None, state=None):
        self.spec = arch_for(model.config)
        self.dims = model_dims(model.config, model.state_dict() if state is None else state)
        self.tied = not any(p.hf_name == "lm_head.weight" for p in plans)
        self.cfg, self.sens, self.imatrix = cfg, sens, imatrix

    def module(self, p) -> str:
        return "lm_head" if (p.gguf_name == "token_embd.weight" and self.tied) else _module_of(p.hf_name)

    def has_hessian(self, p) -> bool:
        return self.sens is not None and self.module(p) in self.sens.hessian

    def of(self, p):
        sens, spec, dims = self.sens, self.spec, self.dims
        W = torch.from_numpy(p.load())
        rows, cols = W.shape
        mod = self.module(p)
        H = F = None
        if self.has_hessian(p):
            H = sens.hessian[mod]
            if H.shape[0] < cols:  # zero-padded FFN columns never see input
                H = torch.nn.functional.pad(H, (0, cols - H.shape[0], 0, cols - H.shape[0]))
            F = _pad_to(sens.fisher.get(mod, torch.ones(rows)), rows)
            if spec.permute_qk and (".self_attn.q_proj." in p.hf_name or ".self_attn.k_proj." in p.hf_name):
                F = torch.from_numpy(permute_for_rope(F.numpy().reshape(-1, 1), rows // dims.head_dim).reshape(-1))
        emb_rows = ((sens.embed_ids, sens.embed_g2) if (sens is not None and sens.embed_ids is not None
                                                         and p.gguf_name == "token_embd.weight") else None)
        imp = None
        if self.cfg.importance:
            if self.imatrix is not None and self.imatrix.get(p.gguf_name) is not None:
                imp = torch.from_numpy(np.asarray(self.imatrix.get(p.gguf_name), dtype=np.float32).reshape(-1))
            elif H is not None:
                imp = torch.diag(H).clamp_min(0)
        return W, H, F, emb_rows, imp
