"""Bit allocation: one type per tensor, minimising the total measured error under a size budget.

    allocate(options, budget_bytes) -> Allocation(choice {tensor: type}, bytes, error)

options: {tensor: {type: (n_bytes, error)}}; every tensor must have at least one option. This is a
multiple-choice knapsack, solved two ways and the better kept:
- Lagrangian: for a multiplier lam each tensor takes the type minimising error + lam * bytes;
  bisection finds the smallest lam whose total fits (optimal for its own size, may leave budget unspent);
- dynamic programming over the budget in units of budget / DP_UNITS bytes, sizes rounded up (exact
  when the unit is one byte; otherwise feasible and within the rounding of the optimum).
Each result then gets a greedy pass that upgrades the tensor with the best error drop per extra byte
while the budget allows. Pure function of numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from birdbone_core.errors import BirdboneError

Options = dict[str, dict[str, tuple[int, float]]]
DP_UNITS = 4000  # budget resolution of the dynamic program


@dataclass
class Allocation:
    choice: dict[str, str]
    n_bytes: int
    error: float
    budget: int


def _pick(options: Options, lam: float) -> dict[str, str]:
    # ties broken toward fewer bytes, then by type name, so the result is deterministic
    return {t: min(opts, key=lambda k: (opts[k][1] + lam * opts[k][0], opts[k][0], k)) for t, opts in options.items()}


def _totals(options: Options, choice: dict[str, str]) -> tuple[int, float]:
    return (sum(options[t][k][0] for t, k in choice.items()), sum(options[t][k][1] for t, k in choice.items()))


def allocate(options: Options, budget_bytes: int) -> Allocation:
    if not options:
        return Allocation({}, 0, 0.0, budget_bytes)
    for t, opts in options.items():
        if not opts:
            raise BirdboneError(f"bit budget: tensor {t} has no allowed type")
    smallest = {t: min(opts, key=lambda k: (opts[k][0], opts[k][1], k)) for t, opts in options.items()}
    min_bytes, _ = _totals(options, smallest)
    if min_bytes > budget_bytes:
        raise BirdboneError(f"bit budget of {budget_bytes} bytes is below the smallest possible size "
                            f"({min_bytes} bytes with the allowed types)")
    lo, hi = 0.0, 1.0
    while _totals(options, _pick(options, hi))[0] > budget_bytes:
        hi *= 4
        if hi > 1e300:
            break
    choice = _pick(options, 0.0)
    if _totals(options, choice)[0] > budget_bytes:
        for _ in range(200):
            mid = (lo + hi) / 2
            if _totals(options, _pick(options, mid))[0] > budget_bytes:
                lo = mid
            else:
                hi = mid
        choice = _pick(options, hi)
        if _totals(options, choice)[0] > budget_bytes:
            choice = smallest
    best = _greedy_fill(options, choice, budget_bytes)
    dp = _dynamic_program(options, budget_bytes)
    if dp is not None:
        dp = _greedy_fill(options, dp, budget_bytes)
        if _totals(options, dp)[1] < _totals(options, best)[1]:
            best = dp
    n, err = _totals(options, best)
    return Allocation(best, n, err, budget_bytes)


def _dynamic_program(options: Options, budget: int) -> dict[str, str] | None:
    """Multiple-choice knapsack by DP over capacity units (sizes rounded up); None if nothing fits."""
    unit = max(1, -(-budget // DP_UNITS))
    cap = budget // unit
    names = list(options)
    inf = float("inf")
    dp = np.full(cap + 1, inf)
    dp[0] = 0.0
    picks = []
    for t in names:
        keys = sorted(options[t])
        new = np.full(cap + 1, inf)
        arg = np.full(cap + 1, -1, dtype=np.int16)
        for i, k in enumerate(keys):
            b, e = options[t][k]
            c = -(-b // unit)
            if c > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[c:] = dp[: cap + 1 - c] + e
            better = cand < new
            new[better], arg[better] = cand[better], i
        dp = new
        picks.append((keys, arg))
    j = int(np.argmin(dp))
    if not np.isfinite(dp[j]):
        return None
    choice = {}
    for t, (keys, arg) in zip(reversed(names), reversed(picks)):
        k = keys[int(arg[j])]
        choice[t] = k
        j -= -(-options[t][k][0] // unit)
    return choice


def _greedy_fill(options: Options, choice: dict[str, str], budget: int) -> dict[str, str]:
    choice = dict(choice)
    used, _ = _totals(options, choice)
    while True:
        best, best_rate = None, 0.0
        for t, k in choice.items():
            b0, e0 = options[t][k]
            for k2, (b, e) in options[t].items():
                if e < e0 and used - b0 + b <= budget:
                    rate = (e0 - e) / max(b - b0, 1e-9) if b > b0 else float("inf")
                    if best is None or rate > best_rate:
                        best, best_rate = (t, k2), rate
        if best is None:
            return choice
        t, k2 = best
        used += options[t][k2][0] - options[t][choice[t]][0]
        choice[t] = k2
