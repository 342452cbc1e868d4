"""Airflow operators for birdbone runs: one `birdbone` CLI step per task (local subprocess or Kubernetes
pod, same command line), the stop-loss branch that follows a wave's `decide` step, and the ops signals
(operators.signals) their callbacks push. The operator classes are imported on first use, so
`operators.signals` and `operators.settings` load without Airflow's heavy imports."""
from __future__ import annotations

import importlib

_LAZY = {"BirdboneStepOperator": "operators.birdbone_step", "birdbone_argv": "operators.birdbone_step",
         "StopLossBranchOperator": "operators.stop_loss", "check_decision": "operators.stop_loss"}

__all__ = [*_LAZY, "settings", "signals"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in ("settings", "signals"):
        return importlib.import_module(f"operators.{name}")
    raise AttributeError(f"module 'operators' has no attribute {name!r}")
