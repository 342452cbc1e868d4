"""The stop-loss branch follows RUN/waves/K/decision.json and refuses anything it cannot trust."""
from __future__ import annotations

import json

import pytest
from airflow.sdk.exceptions import AirflowFailException

from operators.stop_loss import StopLossBranchOperator, read_decision


def _decide(run, wave: int, action: str, reason: str = "because", name: str | None = None) -> None:
    d = run / "waves" / (name or str(wave))
    d.mkdir(parents=True)
    (d / "decision.json").write_text(json.dumps({"wave": wave, "action": action, "reason": reason}))


def _op(run, wave: int, last: bool = False) -> StopLossBranchOperator:
    return StopLossBranchOperator(task_id=f"stop_loss_{wave}", run_dir=str(run), wave=wave,
                                  next_wave=None if last else f"wave_{wave + 1:02d}.prune",
                                  rollback=f"wave_{wave:02d}.to_rollback", finish=f"wave_{wave:02d}.to_finish")


@pytest.mark.parametrize("action,expected", [("continue", "wave_03.prune"), ("rollback", "wave_02.to_rollback"),
                                             ("finish", "wave_02.to_finish")])
def test_branch_follows_the_decision(tmp_path, action, expected):
    _decide(tmp_path, 2, action)
    assert _op(tmp_path, 2).choose_branch({}) == expected


def test_zero_padded_wave_directory_is_read(tmp_path):
    _decide(tmp_path, 4, "finish", name="004")
    assert read_decision(tmp_path, 4)["action"] == "finish"


def test_continue_past_the_last_slot_fails_loudly(tmp_path):
    _decide(tmp_path, 10, "continue")
    with pytest.raises(AirflowFailException, match="wave slots"):
        _op(tmp_path, 10, last=True).choose_branch({})


def test_missing_or_inconsistent_decision_fails(tmp_path):
    with pytest.raises(AirflowFailException, match="no decision for wave 1"):
        read_decision(tmp_path, 1)
    _decide(tmp_path, 1, "maybe")
    with pytest.raises(AirflowFailException, match="action"):
        read_decision(tmp_path, 1)
    _decide(tmp_path, 2, "finish", name="3")                 # file of wave 2 in wave 3's directory
    with pytest.raises(AirflowFailException, match="expected wave 3"):
        read_decision(tmp_path, 3)
    d = tmp_path / "waves" / "5"
    d.mkdir()
    (d / "decision.json").write_text("{not json")
    with pytest.raises(AirflowFailException, match="not valid JSON"):
        read_decision(tmp_path, 5)
