"""The stop-loss branch after a wave's `decide` step: take the decision the decide task returned (its
XCom, written by `birdbone wave RUN K decide` to $BIRDBONE_RESULT_JSON), log its reason, follow its action.

    {"wave": K, "action": "continue" | "rollback" | "finish", "verdict": ..., "reason": "...", ...}
      continue -> the next wave's first task;  rollback -> the rollback path;  finish -> the finish path

The decision travels with the task instance, so the Airflow worker that runs the branch needs no access to
the run directory (in Kubernetes mode only the step pods mount it).
"""
from __future__ import annotations

from airflow.sdk import BaseBranchOperator
from airflow.sdk.exceptions import AirflowFailException

ACTIONS = ("continue", "rollback", "finish")


def check_decision(d: object, wave: int, source: str) -> dict:
    """`d` if it is wave `wave`'s decision with a known action; else a failure naming `source`."""
    if d is None:
        raise AirflowFailException(f"{source}: no decision for wave {wave} (the decide step returned none)")
    if not isinstance(d, dict):
        raise AirflowFailException(f"{source}: expected a decision object, got {type(d).__name__}")
    if d.get("wave") != wave or d.get("action") not in ACTIONS:
        raise AirflowFailException(f"{source}: expected wave {wave} with action in {ACTIONS}, got "
                                   f"wave={d.get('wave')!r} action={d.get('action')!r}")
    return d


class StopLossBranchOperator(BaseBranchOperator):
    """Branch on wave K's decision, pulled from task `decide_task`'s XCom. `next_wave`, `rollback` and
    `finish` are task ids; `next_wave` is None for the DAG's last wave slot (a recipe with more waves than
    the DAG has slots fails here, loudly)."""

    ui_color = "#f6e0b5"

    def __init__(self, *, decide_task: str, wave: int, next_wave: str | None, rollback: str, finish: str,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.decide_task, self.wave = decide_task, wave
        self.next_wave, self.rollback, self.finish = next_wave, rollback, finish

    def choose_branch(self, context) -> str:
        ti = context["ti"]
        d = check_decision(ti.xcom_pull(task_ids=self.decide_task), self.wave, f"XCom of {self.decide_task}")
        self.log.info("stop-loss, wave %d: %s -> %s", self.wave, d.get("reason", "(no reason given)"), d["action"])
        if d["action"] == "continue":
            if self.next_wave is None:
                raise AirflowFailException(
                    f"wave {self.wave} says continue, but this DAG has only {self.wave} wave slots: "
                    "set BIRDBONE_WAVE_SLOTS higher where the DAG is parsed, or use fewer waves")
            return self.next_wave
        return self.rollback if d["action"] == "rollback" else self.finish
