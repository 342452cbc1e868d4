"""The stop-loss branch after a wave's `decide` step: read RUN/waves/K/decision.json, log its reason,
and follow its action.

    {"wave": K, "action": "continue" | "rollback" | "finish", "verdict": ..., "reason": "...", ...}
      continue -> the next wave's first task;  rollback -> the rollback path;  finish -> the finish path
"""
from __future__ import annotations

import json
from pathlib import Path

from airflow.sdk import BaseBranchOperator
from airflow.sdk.exceptions import AirflowFailException

ACTIONS = ("continue", "rollback", "finish")


def decision_path(run_dir: str | Path, wave: int) -> Path:
    """RUN/waves/K/decision.json (a zero-padded directory name is accepted too)."""
    root = Path(run_dir) / "waves"
    for name in (str(wave), f"{wave:03d}", f"{wave:02d}"):
        p = root / name / "decision.json"
        if p.is_file():
            return p
    return root / str(wave) / "decision.json"


def read_decision(run_dir: str | Path, wave: int) -> dict:
    p = decision_path(run_dir, wave)
    if not p.is_file():
        raise AirflowFailException(f"{p}: no decision for wave {wave} (the decide step did not run)")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise AirflowFailException(f"{p}: not valid JSON ({e.msg})") from None
    if d.get("wave") != wave or d.get("action") not in ACTIONS:
        raise AirflowFailException(f"{p}: expected wave {wave} with action in {ACTIONS}, got "
                                   f"wave={d.get('wave')!r} action={d.get('action')!r}")
    return d


class StopLossBranchOperator(BaseBranchOperator):
    """Branch on wave K's decision. `next_wave`, `rollback` and `finish` are task ids; `next_wave` is None
    for the DAG's last wave slot (a recipe with more waves than the DAG has slots fails here, loudly)."""

    template_fields = ("run_dir",)
    ui_color = "#f6e0b5"

    def __init__(self, *, run_dir: str, wave: int, next_wave: str | None, rollback: str, finish: str,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.run_dir, self.wave = run_dir, wave
        self.next_wave, self.rollback, self.finish = next_wave, rollback, finish

    def choose_branch(self, context) -> str:
        d = read_decision(self.run_dir, self.wave)
        self.log.info("stop-loss, wave %d: %s -> %s", self.wave, d.get("reason", "(no reason given)"), d["action"])
        ti = context.get("ti")
        if ti is not None:
            ti.xcom_push(key="decision", value=d)
        if d["action"] == "continue":
            if self.next_wave is None:
                raise AirflowFailException(
                    f"wave {self.wave} says continue, but this DAG has only {self.wave} wave slots: "
                    "raise MAX_WAVES in dags/birdbone_compress.py or use fewer waves")
            return self.next_wave
        return self.rollback if d["action"] == "rollback" else self.finish
