"""Stop-loss: decide after each wave whether to keep going, and when to roll back.

Rule (the seed's): a wave is *bad* when validation perplexity rises more than `threshold` (relative)
over the last accepted state. A good wave is accepted. After `patience` bad waves in a row, roll back to
the last accepted state. A non-finite perplexity rolls back at once. Pure function of numbers.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal


@dataclass(frozen=True)
class Verdict:
    action: Literal["accept", "continue", "rollback"]
    reason: str
    accepted_wave: int      # the last accepted state after this decision
    accepted_ppl: float
    strikes: int            # consecutive bad waves so far

    def as_dict(self) -> dict:
        return asdict(self)


def stop_loss(wave: int, ppl: float, accepted_wave: int, accepted_ppl: float, strikes: int,
              threshold: float = 0.03, patience: int = 2) -> Verdict:
    if not math.isfinite(ppl):
        return Verdict("rollback", f"wave {wave}: perplexity is {ppl}; rolling back to wave {accepted_wave}",
                       accepted_wave, accepted_ppl, strikes + 1)
    rise = ppl / accepted_ppl - 1.0
    if rise <= threshold:
        return Verdict("accept", f"wave {wave}: ppl {ppl:.3f} is {rise:+.1%} vs wave {accepted_wave} "
                                 f"(limit {threshold:+.0%}); accepted", wave, ppl, 0)
    strikes += 1
    if strikes >= patience:
        return Verdict("rollback", f"wave {wave}: ppl {ppl:.3f} is {rise:+.1%} vs wave {accepted_wave}, "
                                   f"{strikes} bad waves in a row; rolling back to wave {accepted_wave}",
                       accepted_wave, accepted_ppl, strikes)
    return Verdict("continue", f"wave {wave}: ppl {ppl:.3f} is {rise:+.1%} vs wave {accepted_wave} "
                               f"(limit {threshold:+.0%}); strike {strikes} of {patience}",
                   accepted_wave, accepted_ppl, strikes)


# ---- accuracy guardrail -------------------------------------------------------------------------------
# Rule (the seed's "lose at most 3% task accuracy"): a wave is *bad* for accuracy when any guarded task's
# accuracy is more than `threshold` (relative) below the *base* model's. After `patience` bad waves in a
# row the run stops at its last accepted state (rollback). A good wave resets the count. Pure function.

@dataclass(frozen=True)
class AccuracyVerdict:
    action: Literal["accept", "continue", "rollback"]
    reason: str
    strikes: int                    # consecutive waves with an accuracy drop beyond the threshold
    drops: dict[str, float]         # task -> relative change vs base (negative = worse)
    failing: list[str]              # tasks beyond the threshold this wave, worst first

    def as_dict(self) -> dict:
        return asdict(self)


def accuracy_guard(wave: int, accuracy: dict[str, float], base: dict[str, float], strikes: int,
                   threshold: float = 0.03, patience: int = 2) -> AccuracyVerdict:
    """accuracy / base: task -> accuracy (primary metric) of this wave / of the base model."""
    missing = sorted(set(base) - set(accuracy))
    if missing:
        raise ValueError(f"wave {wave}: no accuracy for task(s) {', '.join(missing)}")
    drops = {t: (accuracy[t] / base[t] - 1.0) if base[t] > 0 else 0.0 for t in sorted(base)}
    bad = sorted((t for t, d in drops.items() if not math.isfinite(accuracy[t]) or d < -threshold),
                 key=lambda t: drops[t])
    if not bad:
        worst = min(drops, key=drops.get) if drops else None
        what = f"{worst} {accuracy[worst]:.3f} is {drops[worst]:+.1%} vs base {base[worst]:.3f}" if worst else "no tasks"
        return AccuracyVerdict("accept", f"wave {wave}: accuracy ok ({what}, limit -{threshold:.0%})",
                               0, drops, [])
    strikes += 1
    t = bad[0]
    what = (f"{t} accuracy {accuracy[t]:.3f} is {drops[t]:+.1%} vs base {base[t]:.3f} "
            f"(limit -{threshold:.0%})" + (f"; also {', '.join(bad[1:])}" if bad[1:] else ""))
    if strikes >= patience:
        return AccuracyVerdict("rollback", f"wave {wave}: {what}, {strikes} bad waves in a row; accuracy "
                                           f"guardrail stops the run", strikes, drops, bad)
    return AccuracyVerdict("continue", f"wave {wave}: {what}; accuracy strike {strikes} of {patience}",
                           strikes, drops, bad)


def combine(ppl: Verdict, acc: AccuracyVerdict, prev_accepted_wave: int, prev_accepted_ppl: float) -> Verdict:
    """One verdict from the perplexity stop-loss and the accuracy guardrail: the stricter one wins.
    A wave only counts as accepted when both accept; prev_* is the accepted state before this wave."""
    if acc.action == "accept":
        return ppl
    if acc.action == "rollback" or ppl.action == "rollback":
        reason = acc.reason if acc.action == "rollback" else ppl.reason
        return Verdict("rollback", f"{reason}; rolling back to wave {prev_accepted_wave}",
                       prev_accepted_wave, prev_accepted_ppl, max(ppl.strikes, acc.strikes))
    return Verdict("continue", acc.reason, prev_accepted_wave, prev_accepted_ppl, max(ppl.strikes, acc.strikes))
