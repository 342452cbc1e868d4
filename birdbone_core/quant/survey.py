"""Survey and shortlist: the quantizer's cheap first pass over every (tensor, type).

Encoding each tensor in every allowed block type is most of a quantization run's time, yet under a
given budget a tensor only ever lands on one of a few neighbouring sizes. So first each tensor's
error is estimated for every type on a strided sample of its rows (`SURVEY_SHARE` of its weights, at
least `SURVEY_MIN_WEIGHTS`), encoded as the full search would encode them (GPTQ's rows are independent
problems under one H, so GPTQ of a row sample is exactly those rows of the whole tensor's GPTQ), the
better of GPTQ and plain rounding, scaled up to the whole tensor (the error model sums over rows). The budget is allocated on those estimates, and each
tensor's shortlist is the size levels around its allocated one; only the shortlist is then encoded
in full (GPTQ included) and allocated again on exact figures.

    sample_rows(rows, cols) -> row indices [n] (None: every row)
    survey_errors(W, types, H, F, emb_rows, importance, gptq) -> {type: estimated loss of the whole tensor}
    shortlist(options, budget_bytes, width, wide) -> {tensor: [types]}
"""
from __future__ import annotations

import math

import torch

from birdbone_core.quant.budget import Options, allocate
from birdbone_core.quant.codecs import encode_torch
from birdbone_core.quant.error import encoded_loss
from birdbone_core.quant.gptq import GPTQSettings, gptq_quantize_many

SURVEY_SHARE = 1 / 64  # share of a tensor's weights encoded by the survey
SURVEY_MIN_WEIGHTS = 1 << 15  # ... but at least this many (whole rows); small tensors are surveyed whole
# a type whose estimate is above this multiple of the best at its own size is left out of the shortlist:
# GPTQ lowers errors by different amounts per type, never by this much more for one of two equal-size types
LEVEL_SLACK = 1.25


def sample_rows(rows: int, cols: int) -> torch.Tensor | None:
    """Evenly spread row indices covering ~SURVEY_SHARE of a [rows, cols] tensor (None: all rows)."""
    n = max(1, math.ceil(max(SURVEY_MIN_WEIGHTS, rows * cols * SURVEY_SHARE) / cols))
    if n >= rows:
        return None
    return torch.unique(torch.linspace(0, rows - 1, n).round().long())


def survey_errors(W: torch.Tensor, types: list[str], H: torch.Tensor | None, F: torch.Tensor | None,
                  emb_rows: tuple[torch.Tensor, torch.Tensor] | None,
                  importance: torch.Tensor | None, gptq: GPTQSettings | None = None,
                  device: torch.device | str = "cpu") -> dict[str, float]:
    """Estimated loss (`error.encoded_loss`) of W [rows, cols] encoded in each type, from a row sample:
    with `gptq` settings (and H) the lower of GPTQ's and plain rounding's, else plain rounding. GPTQ's
    column loop runs on `device` (as the full search's does); the results are scored on the host.
    F [rows]: output Fisher per row; emb_rows: (looked-up row ids [m], their lookup Fisher [m, cols])."""
    rows, cols = W.shape
    idx = sample_rows(rows, cols)
    scale = 1.0
    if idx is not None:
        scale = rows / len(idx)
        W = W[idx]
        F = None if F is None else F[idx]
        if emb_rows is not None:
            ids, g2 = emb_rows
            hit = torch.isin(ids, idx)
            emb_rows = (torch.searchsorted(idx, ids[hit]), g2[hit])
    if gptq is not None and H is not None:
        imp = importance if importance is not None else torch.ones(cols)
        runs = gptq_quantize_many(W.to(device), H.to(device), types, gptq, importance=imp.to(device))
        return {t: min(encoded_loss(t, r.packed, W, H, F, emb_rows),
                       encoded_loss(t, r.plain_packed, W, H, F, emb_rows)) * scale for t, r in runs.items()}
    return {t: encoded_loss(t, encode_torch(t, W, importance)[0], W, H, F, emb_rows) * scale for t in types}


def shortlist(options: Options, budget_bytes: int, width: int, wide: set[str] = frozenset()) -> dict[str, list[str]]:
    """options: {tensor: {type: (bytes, estimated error)}}. The budget's allocation on the estimates picks a
    size for each tensor; its shortlist is the types at that size and at `width` efficient sizes either side
    (`width + 1` for tensors in `wide`), each within LEVEL_SLACK of the best estimate at its size. A size
    is efficient when its best estimate is below that of every smaller size."""
    choice = allocate(options, budget_bytes).choice
    out = {}
    for name, opts in options.items():
        best: dict[int, float] = {}
        for b, e in opts.values():
            best[b] = min(e, best.get(b, math.inf))
        levels, lowest = [], math.inf
        for b in sorted(best):
            if best[b] < lowest:
                levels.append(b)
                lowest = best[b]
        here = opts[choice[name]][0]
        i = levels.index(here) if here in levels else sum(b < here for b in levels)
        w = width + (1 if name in wide else 0)
        keep = set(levels[max(0, i - w): i + w + 1]) | {here}
        out[name] = sorted(t for t, (b, e) in opts.items() if b in keep and e <= LEVEL_SLACK * best[b])
    return out
