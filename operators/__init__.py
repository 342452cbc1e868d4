"""Airflow operators for birdbone runs: one `birdbone` CLI step per task (local subprocess or Kubernetes
pod, same command line) and the stop-loss branch that follows a wave's `decide` step."""
from operators.birdbone_step import BirdboneStepOperator, birdbone_argv
from operators.stop_loss import StopLossBranchOperator, read_decision

__all__ = ["BirdboneStepOperator", "StopLossBranchOperator", "birdbone_argv", "read_decision"]
