"""The numbers of one run, as the report uses them: one dataclass per wave / rollback / ledger state, and
the small pure helpers that normalise what the loop records (healing curves, verdict words).
`birdbone_core.report.collect` fills a RunData from a run directory."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

# decoder-layer index in a tensor name: model.layers.12.mlp.up_proj.weight -> 12
LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
WAVE_METRICS = ("target", "sparsity", "ppl_pruned", "ppl_healed", "kld", "top1", "healing_recovered",
                 "seconds", "prune_seconds")


@dataclass
class WaveRow:
    """One pruning wave: what it aimed for, what it cost, what healing won back, what was decided."""
    wave: int
    target: float | None = None              # cumulative sparsity the wave aimed for (of the pruned modules)
    sparsity: float | None = None            # zeros / elements of the pruned modules after the wave
    ppl_pruned: float | None = None          # validation ppl right after pruning
    ppl_healed: float | None = None          # ... after healing (the number the stop-loss judges)
    kld: float | None = None
    top1: float | None = None
    healing_recovered: float | None = None   # share of the wave's ppl loss healing won back
    seconds: float | None = None
    prune_seconds: float | None = None
    action: str | None = None                # stop-loss verdict: accept | strike | rollback
    reason: str | None = None
    next_step: str | None = None             # what the run did next (decision.json "action"):
                                             # continue | rollback | finish
    accepted_ppl: float | None = None        # the last accepted ppl *after* this decision (verdict)
    heal_curves: dict[str, list[float]] = field(default_factory=dict)  # label -> loss at each step
    heal: dict = field(default_factory=dict)  # healing summary: method, steps, lr, loss/kl before and after

    @property
    def ppl(self) -> float | None:
        return self.ppl_healed if self.ppl_healed is not None else self.ppl_pruned


@dataclass
class Rollback:
    wave: int                                # the ledger wave that records the rollback
    rollback_to: int
    ppl: float | None = None
    reason: str | None = None


@dataclass
class LedgerWave:
    """A ledger entry, reduced to what the report draws."""
    wave: int
    kind: str                                # base | wave | revert
    decision: str | None
    reverts_to: int | None
    sparsity: float                          # whole-state zeros / elements
    changed: int
    linear_sparsity: float | None            # zeros / elements of all decoder layers' 2-D weights
    layer_sparsity: dict[int, float]         # decoder layer -> zeros / elements of its 2-D weights
    module_sparsity: dict[tuple[int, str], float]  # (layer, module kind e.g. "q_proj") -> sparsity


@dataclass
class RunData:
    root: Path
    name: str
    model: str | None = None
    recipe_name: str | None = None
    mode: str | None = None                  # "waves" | "one-shot" | None (not pruned yet)
    method: str | None = None
    pattern: str | None = None
    targets: list[float] = field(default_factory=list)
    heal_method: str | None = None           # recipe waves.heal.method (None: one-shot or unknown)
    threshold: float | None = None           # stop-loss: relative ppl rise allowed
    patience: int | None = None
    base_ppl: float | None = None
    accepted_wave: int | None = None
    final_sparsity: float | None = None
    sparsity_at: str = "final state"         # which state final_sparsity describes (in-progress: last recorded)
    prune_seconds: float | None = None
    waves: list[WaveRow] = field(default_factory=list)
    rollbacks: list[Rollback] = field(default_factory=list)
    ledger: list[LedgerWave] = field(default_factory=list)
    metrics: dict | None = None              # RUN/metrics.json
    steps_done: list[str] = field(default_factory=list)       # run.json's completed steps
    wave_steps: dict[int, list[str]] = field(default_factory=dict)  # wave -> its completed step records
    missing: list[str] = field(default_factory=list)  # one line per piece of data the run does not have

    def find(self, k: int) -> WaveRow | None:
        return next((w for w in self.waves if w.wave == k), None)

    def wave(self, k: int) -> WaveRow:
        """The row of wave k, created (in wave order) if the run has none yet."""
        for w in self.waves:
            if w.wave == k:
                return w
        row = WaveRow(wave=k)
        self.waves.append(row)
        self.waves.sort(key=lambda r: r.wave)
        return row

    @property
    def has_curves(self) -> bool:
        return any(w.heal_curves for w in self.waves)


def num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _curve(v) -> list[float] | None:
    if isinstance(v, list) and v and all(num(x) is not None for x in v):
        return [float(x) for x in v]
    return None


def heal_curves(obj) -> dict[str, list[float]]:
    """Loss-per-step curves from the forms healing records take: a flat list (distillation: one curve),
    a list of lists (one per decoder layer), a HealReport dict ({"layers": [{"curve": [...]}, ...]}),
    {"layer_curves": [[...], ...]}, or a dict wrapping any of these under "heal_curve", "heal" (ledger
    metrics) or "report" (RUN/waves/K/heal.json). Unknown shapes give {}."""
    if isinstance(obj, dict):
        for key in ("heal_curve", "heal", "report", "curve", "layer_curves", "layers"):
            if key in obj:
                found = heal_curves(obj[key])
                if found:
                    return found
        return {}
    flat = _curve(obj)
    if flat:
        return {"overall": flat}
    out = {}
    if isinstance(obj, list):
        for i, c in enumerate(obj):
            c = _curve(c.get("curve")) if isinstance(c, dict) else _curve(c)
            if c:
                out[f"layer {i}"] = c
    return out


def pct_limit(t: float) -> str:
    """A stop-loss threshold as a signed percentage that keeps small limits visible: 0.03 -> "+3%",
    0.002 -> "+0.2%"."""
    return f"{t * 100:+.3g}%"


def verdict_name(action: str | None) -> str | None:
    """The stop-loss's own word for a bad-but-tolerated wave is "continue" (guard.Verdict); the step
    contract calls it "strike". Reports use the contract's words: accept | strike | rollback."""
    return "strike" if action == "continue" else action


def split_decision(text: str | None) -> tuple[str | None, str | None]:
    """The ledger's decision string "accept: wave 2: ppl ... accepted" -> ("accept", "wave 2: ...")."""
    if not text:
        return None, None
    head, sep, rest = text.partition(": ")
    if sep and head in ("accept", "continue", "rollback", "strike"):
        return verdict_name(head), rest
    return None, text


