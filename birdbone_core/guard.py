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
