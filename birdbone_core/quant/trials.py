"""Measured choice between bit allocations: the budget's error model is an estimate (second order, one
tensor at a time, errors added up), and where one tensor holds a large share of the weights (Gemma 3's
262k x 640 tied embedding: 63%) the choice of its type decides most of the file, so an error of the
estimate there costs the most. For each type of those "big" tensors, and each of its two encodings
(GPTQ's and plain rounding's, which the estimate also ranks imperfectly), the rest of the budget is
allocated by the estimate; each allocation is then put into the model (its exact decoded bytes) and
scored by the mean KL(base || quantized) of next-token distributions on held-out calibration blocks.
The lowest measured KL wins.

    choose_measured(model, cands, budget_bytes, blocks) -> (QuantResult, [Trial])

Cost: one forward pass over `blocks` per distinct allocation (plus one for the base), with the
model's 2-D weights swapped in and restored afterwards (exact bytes back).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np
import torch

from birdbone_core.export.arch import arch_for, model_dims, plan_tensors, to_hf_layout
from birdbone_core.progress import progress_bar
from birdbone_core.quant.codecs import decode
from birdbone_core.quant.engine import ALTERNATE_SHARE, Candidates, QuantResult, choose
from birdbone_core.quant.formats import get_format
from birdbone_core.runtime import model_device

BIG_SHARE = ALTERNATE_SHARE  # a tensor with at least this share of the budgeted weights gets its types tried
MAX_BIG = 2  # at most this many big tensors (their types multiply the number of trials)


@dataclass
class Trial:
    big_types: dict[str, str]  # big tensor -> "TYPE (encoding)" in this allocation: gptq, rounding or source
    estimate: float  # the budget's summed estimated error
    measured_kl: float  # mean KL(base || quantized) per predicted token on the held-out blocks
    n_bytes: int
    chosen: bool = False


def big_tensors(c: Candidates, share: float = BIG_SHARE, at_most: int = MAX_BIG) -> list[str]:
    """Budgeted tensors holding >= `share` of the budgeted weights, largest first."""
    sizes = {n: _n_weights(c, n) for n in c.options}
    total = sum(sizes.values()) or 1
    big = sorted((n for n, s in sizes.items() if s >= share * total), key=lambda n: -sizes[n])
    return big[:at_most]


def _n_weights(c: Candidates, name: str) -> int:
    # every candidate type of a tensor holds the same weights; bytes / bytes-per-weight of any one
    t, (n_bytes, _) = next(iter(c.options[name].items()))
    fmt = get_format(t)
    return n_bytes // fmt.type_size * fmt.block_size


def _primary(c: Candidates, name: str, t: str) -> str:
    """How the candidate the estimate kept for (tensor, type) was encoded: source, gptq or rounding."""
    if c.from_source.get(name) == t:
        return "source"
    return "gptq" if c.gptq_won.get(name, {}).get(t) else "rounding"


def _variants(c: Candidates, name: str) -> list[tuple[str, str]]:
    """(type, encoding) pairs of a big tensor: the estimate's pick per type, and its alternate if kept."""
    out = []
    for t in sorted(c.options[name]):
        first = _primary(c, name, t)
        out.append((t, first))
        if first != "source" and t in c.alternates.get(name, {}):
            out.append((t, "rounding" if first == "gptq" else "gptq"))
    return out


def _with_variants(c: Candidates, pick: dict[str, tuple[str, str]]) -> Candidates:
    """Candidates with each big tensor restricted to one (type, encoding)."""
    options, packed = dict(c.options), dict(c.packed)
    for n, (t, enc) in pick.items():
        alt = c.alternates.get(n, {}).get(t)
        if alt is not None and enc != _primary(c, n, t):
            options[n] = {t: (c.options[n][t][0], alt[1])}
            packed[n] = {t: alt[0]}
        else:
            options[n] = {t: c.options[n][t]}
    return Candidates(options, packed, c.fixed, c.fixed_bytes, c.n_weights, c.gptq_won, 0.0, c.from_source,
                      c.alternates)


def allocations(c: Candidates, budget_bytes: int, big: list[str]) -> list[tuple[dict[str, str], QuantResult, float]]:
    """One allocation per feasible combination of the big tensors' (type, encoding) - the rest by the
    estimate - deduplicated, the estimate's own optimum first.
    Returns [({big tensor: "TYPE (encoding)"}, result, its summed estimated error)]."""
    out: list[tuple[dict[str, str], QuantResult, float]] = []
    seen: set[tuple] = set()
    first = choose(c, budget_bytes)
    primary = {n: (first.types[n], _primary(c, n, first.types[n])) for n in big}
    combos = [primary] + [dict(zip(big, vs)) for vs in itertools.product(*(_variants(c, n) for n in big))]
    for combo in combos:
        sub = _with_variants(c, combo)
        smallest = sum(min(b for b, _ in o.values()) for o in sub.options.values())
        if smallest > budget_bytes - c.fixed_bytes:
            continue
        r = choose(sub, budget_bytes)
        key = tuple(sorted(r.types.items())) + tuple(sorted(combo.items()))
        if key not in seen:
            seen.add(key)
            estimate = sum(sub.options[n][t][1] for n, t in r.types.items() if n in sub.options)
            out.append(({n: f"{t} ({enc})" for n, (t, enc) in combo.items()}, r, estimate))
    return out


def hf_weight(spec, dims, hf_name: str, t: str, data, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """The tensor GGUF data `data` of type `t` and GGUF `shape` decodes to, in the HF layout, dtype and
    device of the parameter `like` (q/k rows un-permuted, FFN padding dropped)."""
    a = (np.asarray(data, dtype=np.float32).reshape(shape) if t in ("F16", "F32")
         else decode(t, data, shape).numpy())
    new = torch.from_numpy(to_hf_layout(spec, dims, hf_name, a, tuple(like.shape)))
    return new.to(dtype=like.dtype, device=like.device)


class _WeightSwap:
    """Put decoded GGUF tensors into the model's parameters (HF layout) and restore the originals exactly."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.spec = arch_for(model.config)
        state = model.state_dict()
        self.dims = model_dims(model.config, state)
        plans = plan_tensors(model, self.spec, self.dims, model.config, state)
        params = dict(model.named_parameters(remove_duplicate=False))
        self.where = {p.gguf_name: (p.hf_name, params[p.hf_name]) for p in plans if len(p.shape) == 2}
        self.shapes = {p.gguf_name: p.shape for p in plans}
        self.saved: dict[str, torch.Tensor] = {}

    def put(self, quantized: dict[str, tuple[str, np.ndarray]]) -> None:
        for name, (t, data) in quantized.items():
            if name not in self.where:
                continue
            hf_name, param = self.where[name]
            # the decoded tensor becomes the parameter's storage and the original is set aside, not copied:
            # the model's weights are never held twice (a tied embedding and head share the one Parameter)
            new = hf_weight(self.spec, self.dims, hf_name, t, data, self.shapes[name], param)
            self.saved.setdefault(name, param.data)
            param.data = new

    def restore(self) -> None:
        for name, w in self.saved.items():
            self.where[name][1].data = w
        self.saved.clear()


# positions whose KL terms are computed at once: [positions, vocab] float32 temporaries of this many elements
KL_CHUNK_ELEMENTS = 1 << 24


def _log_probs(model, blocks: torch.Tensor, dtype: torch.dtype = torch.float16) -> list[torch.Tensor]:
    """Log-probs per block [seq_len - 1, vocab] in `dtype`, each block's float32 copy freed before the next."""
    device = model_device(model)
    with torch.no_grad():
        return [model(input_ids=b[None].to(device), use_cache=False).logits[0, :-1].float().log_softmax(-1).to(dtype)
                for b in blocks]


def kl_sum(lp: torch.Tensor, lq: torch.Tensor) -> float:
    """Sum over positions of KL(p || q) for log-probs lp (float16 ok), lq [positions, vocab], over chunks of
    positions: no [positions, vocab] float32 temporaries beside lq."""
    total = 0.0
    step = max(1, KL_CHUNK_ELEMENTS // lq.shape[-1])
    for s in range(0, lq.shape[0], step):
        p = lp[s:s + step].float()
        total += float((p.exp() * (p - lq[s:s + step])).sum(dtype=torch.float64))
    return total


def measured_kl(model, blocks: torch.Tensor, base: list[torch.Tensor]) -> float:
    """Mean KL(base || model) per predicted token; base: log-probs per block [seq_len - 1, vocab] (float16 ok)."""
    total, n = 0.0, 0
    device = model_device(model)
    with torch.no_grad():
        for b, lp in zip(blocks, base):
            lq = model(input_ids=b[None].to(device), use_cache=False).logits[0, :-1].float().log_softmax(-1)
            total += kl_sum(lp, lq)
            n += lp.shape[0]
            del lq
    return total / max(n, 1)


def in_memory_kl(model: torch.nn.Module, blocks: torch.Tensor):
    """measure(allocations) -> [measured KL] for choose_measured: each allocation's decoded tensors swapped
    into `model` in turn (restored exactly after)."""
    def measure(allocations: list[dict]) -> list[float]:
        was_training = model.training
        model.eval()
        swap = _WeightSwap(model)
        # base log-probs in float16 ([n, seq_len - 1, vocab]: 0.5 GB for 4 x 256 tokens of a 262k vocabulary)
        base = _log_probs(model, blocks)
        out = []
        try:
            with progress_bar("measuring allocations (KL on held-out calibration)", total=len(allocations)) as advance:
                for q in allocations:
                    swap.put(q)
                    out.append(measured_kl(model, blocks, base))
                    swap.restore()
                    advance()
        finally:
            swap.restore()
            model.train(was_training)
        return out
    return measure


def choose_measured(model: torch.nn.Module | None, c: Candidates, budget_bytes: int, blocks: torch.Tensor | None,
                    share: float = BIG_SHARE, measure=None, release: bool = False) -> tuple[QuantResult, list[Trial]]:
    """The allocation with the lowest measured KL among `allocations` (see the module docstring).
    measure(allocations) -> [KL]: default in_memory_kl(model, blocks) (a streamed model:
    quant.stream.stream_measured_kl). release: the caller is done with `c`: the encodings no allocation
    uses are dropped before measuring (c.packed and c.alternates are emptied)."""
    t0 = time.time()
    big = big_tensors(c, share)
    cands = allocations(c, budget_bytes, big)
    if len(cands) < 2:
        r = cands[0][1] if cands else choose(c, budget_bytes)
        return r, []
    if release:
        c.packed.clear()
        c.alternates.clear()
    measure = measure or in_memory_kl(model, blocks)
    kls = measure([r.quantized for _, r, _ in cands])
    trials = [Trial(combo, estimate, kl, r.n_bytes) for (combo, r, estimate), kl in zip(cands, kls)]
    best = min(range(len(trials)), key=lambda i: (trials[i].measured_kl, i))
    trials[best].chosen = True
    r = cands[best][1]
    r.seconds += time.time() - t0
    r.trials = trials
    return r, trials
