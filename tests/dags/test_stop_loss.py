"""The stop-loss branch follows the decision the decide task returned (its XCom) and refuses anything it
cannot trust; it never reads the run directory."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowFailException

from operators.stop_loss import StopLossBranchOperator, check_decision


def _ctx(decision) -> dict:
    pulled = []

    def xcom_pull(task_ids=None, **_):
        pulled.append(task_ids)
        return decision
    return {"ti": SimpleNamespace(xcom_pull=xcom_pull), "pulled": pulled}


def _op(wave: int, last: bool = False) -> StopLossBranchOperator:
    return StopLossBranchOperator(task_id=f"stop_loss_{wave}", decide_task=f"wave_{wave:02d}.decide", wave=wave,
                                  next_wave=None if last else f"wave_{wave + 1:02d}.prune",
                                  rollback=f"wave_{wave:02d}.to_rollback", finish=f"wave_{wave:02d}.to_finish")


@pytest.mark.parametrize("action,expected", [("continue", "wave_03.prune"), ("rollback", "wave_02.to_rollback"),
                                             ("finish", "wave_02.to_finish")])
def test_branch_follows_the_decide_tasks_xcom(action, expected):
    ctx = _ctx({"wave": 2, "action": action, "reason": "because"})
    assert _op(2).choose_branch(ctx) == expected
    assert ctx["pulled"] == ["wave_02.decide"]


def test_continue_past_the_last_slot_fails_loudly():
    with pytest.raises(AirflowFailException, match="wave slots"):
        _op(10, last=True).choose_branch(_ctx({"wave": 10, "action": "continue"}))


@pytest.mark.parametrize("bad,match", [(None, "no decision for wave 3"), ("finish", "expected a decision object"),
                                       ({"wave": 3, "action": "maybe"}, "action"),
                                       ({"wave": 2, "action": "finish"}, "expected wave 3")])
def test_missing_or_inconsistent_decision_fails(bad, match):
    with pytest.raises(AirflowFailException, match=match):
        _op(3).choose_branch(_ctx(bad))
    with pytest.raises(AirflowFailException, match=match):
        check_decision(bad, 3, "x")
