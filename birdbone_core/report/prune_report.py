"""RUN/prune_report.json: one schema for every way a run is pruned.

A one-shot `birdbone prune` (in memory or streamed layer by layer) and the wave loop's `finish` both write
it through `write_prune_report`, which validates it against `PruneReport`; the run report
(report/collect.py) reads it. A one-shot prune is reported as what it is in the loop's terms: one wave,
accepted, ledger wave 1.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from birdbone_core import atomic

FILE = "prune_report.json"
# what run.json's "prune" step records of it (what `export`, `evaluate` and the CLI read)
SUMMARY_KEYS = ("mode", "method", "pattern", "sparsity", "seconds", "accepted_wave", "calibration", "runtime",
                "streamed")


class LayerErrors(BaseModel):
    """Per-layer detail of a layer-by-layer prune."""

    model_config = ConfigDict(extra="forbid")
    layer_rel_error: list[float] = Field(description="||Y_pruned - Y_dense|| / ||Y_dense|| of each decoder layer's "
                                                     "output on the calibration blocks")
    modules: list[dict] = Field(description="per pruned linear module: name, shape, sparsity (prune.sequential)")


class PruneReport(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["one-shot", "waves"] = Field(description="one-shot: the `prune` step; waves: the loop")
    method: str = Field(description="magnitude, wanda or sparsegpt")
    pattern: str = Field(description="unstructured or N:M")
    targets: list[float] = Field(description="cumulative sparsity target of each wave (one-shot: one)")
    sparsity: float | None = Field(description="zeros among the pruned linear weights of the final state")
    seconds: float = Field(description="pruning (and healing, evaluation, decisions) time")
    base_ppl: float | None = Field(description="the dense model's held-out perplexity (None: not scored yet)")
    accepted_wave: int = Field(description="the last wave the stop-loss accepted (one-shot: 1)")
    ledger_wave: int = Field(description="the ledger wave holding the final state")
    waves: list[dict] = Field(description="one row per wave: its metrics, verdict and next action; a rollback "
                                          "row carries rollback_to")
    calibration: dict = Field(description="the calibration text and sampling")
    runtime: dict | None = Field(None, description="device and dtype the pruning ran on")
    streamed: bool = Field(False, description="pruned one layer at a time from disk")
    layers: LayerErrors | None = Field(None, description="per-layer errors and per-module sparsity")

    def summary(self) -> dict:
        return {k: getattr(self, k) for k in SUMMARY_KEYS}


def one_shot_report(report, targets: list[float], base_ppl: float | None, calibration: dict, runtime: dict,
                    streamed: bool) -> PruneReport:
    """The one-shot prune step's report from prune.sequential's PruneReport (`report`)."""
    import dataclasses

    sparsity = report.overall_sparsity()
    return PruneReport(
        mode="one-shot", method=report.method, pattern=report.pattern, targets=targets, sparsity=sparsity,
        seconds=report.seconds, base_ppl=base_ppl, accepted_wave=1, ledger_wave=1,
        waves=[{"wave": 1, "sparsity": sparsity, "seconds": report.seconds, "action": "finish"}],
        calibration=calibration, runtime=runtime, streamed=streamed,
        layers=LayerErrors(layer_rel_error=report.layer_rel_error,
                           modules=[dataclasses.asdict(m) for m in report.modules]))


def write_prune_report(root: Path, report: PruneReport) -> None:
    atomic.write_json(Path(root) / FILE, report.model_dump())
