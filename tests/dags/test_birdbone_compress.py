"""birdbone_compress end to end with Airflow's own dag.test() and local execution on the fixture model:
two waves with healing, one step process SIGKILLed mid-heal and retried by Airflow (the result must equal
an uninterrupted run, bit for bit), and a too-aggressive recipe that takes the rollback branch (the final
model must equal the last accepted wave's state)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import psutil
import pytest

from airflow_testlib import BIRDBONE, FIXTURE, birdbone, model_tensors, needs_cli

pytestmark = needs_cli

WAVES = """
name: af-waves
calibration: {n_samples: 8, seq_len: 64}
evaluation: {n_ctx: 64, max_chunks: 4}
prune: {method: wanda, sparsity: 0.5}
export: {type: f16}
waves:
  max_per_wave: 0.25
  heal: {method: blockwise, steps: 5, lr: 1.0e-3}
  stop_loss: {threshold: 1.0, patience: 2}
"""

# magnitude to 70% in two waves of 35%, no healing, +5% allowed once: wave 1 passes, wave 2 (about +50%)
# rolls the run back to wave 1
TOO_AGGRESSIVE = """
name: af-too-aggressive
calibration: {n_samples: 8, seq_len: 64}
evaluation: {n_ctx: 64, max_chunks: 4}
prune: {method: magnitude, sparsity: 0.7}
export: {type: f16}
waves:
  max_per_wave: 0.35
  heal: {method: none}
  stop_loss: {threshold: 0.05, patience: 1}
"""


def _states(dag_run) -> dict[str, tuple[str, int]]:
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as s:
        tis = s.query(TaskInstance).filter(TaskInstance.dag_id == dag_run.dag_id,
                                           TaskInstance.run_id == dag_run.run_id)
        return {ti.task_id: (str(ti.state.value if hasattr(ti.state, "value") else ti.state), ti.try_number)
                for ti in tis}


class _KillOnce(threading.Thread):
    """SIGKILL the first `birdbone wave RUN <wave> <step>` process once it has used `cpu_s` of CPU (past
    its imports, inside the step's work), as a node or OOM kill would."""

    def __init__(self, run_dir, wave: int, step: str, cpu_s: float = 4.5):
        super().__init__(daemon=True)
        self.want = ["wave", str(run_dir), str(wave), step]
        self.cpu_s, self.killed, self.stop = cpu_s, None, threading.Event()

    def _match(self, p: psutil.Process) -> bool:
        cmd = p.cmdline()
        return any(cmd[i:i + 4] == self.want for i in range(len(cmd)))

    def run(self):
        while not self.stop.is_set() and self.killed is None:
            for p in psutil.Process().children(recursive=True):
                try:
                    if self._match(p):
                        t = p.cpu_times()
                        if t.user + t.system >= self.cpu_s and p.is_running():
                            os.kill(p.pid, signal.SIGKILL)
                            self.killed = p.pid
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            time.sleep(0.2)


def test_compress_dag_two_waves_survives_a_killed_step(dagbag, airflow_db, runs_root, tmp_path, request):
    recipe = tmp_path / "waves.yaml"
    recipe.write_text(WAVES)
    run = runs_root / "e2e"
    dag = dagbag.dags["birdbone_compress"]
    # the oracle, started now on the other core: the same recipe, uninterrupted, every step in one
    # process (`birdbone run`), 1 thread
    ref = tmp_path / "ref"
    oracle_log = open(tmp_path / "oracle.log", "w")
    oracle = subprocess.Popen(f"'{BIRDBONE}' init '{ref}' --model '{FIXTURE}' -r '{recipe}' && '{BIRDBONE}' run '{ref}'",
                              shell=True, stdout=oracle_log, stderr=subprocess.STDOUT, start_new_session=True)
    request.addfinalizer(lambda: oracle.poll() is None and os.killpg(oracle.pid, signal.SIGKILL))
    killer = _KillOnce(run, 1, "heal")
    killer.start()
    try:
        dr = dag.test(run_conf={"model": str(FIXTURE), "recipe": str(recipe), "run_id": "e2e"})
    finally:
        killer.stop.set()
    st = _states(dr)
    assert killer.killed is not None, "the heal step finished before it could be killed"
    assert str(dr.state.value if hasattr(dr.state, "value") else dr.state) == "success", st
    assert st["wave_01.heal"] == ("success", 2)               # failed once (SIGKILL), retried by Airflow
    for t in ("init", "prepare", "finish", "export", "evaluate", "report", "wave_02.decide", "wave_02.to_finish",
              "wave_01.publish", "publish"):     # publish param false: the publish tasks run and do nothing
        assert st[t][0] == "success", (t, st[t])
    assert (run / "report" / "report.md").is_file()
    for t in ("rollback", "wave_01.to_rollback", "wave_02.to_rollback", "wave_03.prune", "wave_10.stop_loss"):
        assert st[t][0] == "skipped", (t, st[t])
    d1, d2 = (json.loads((run / "waves" / str(k) / "decision.json").read_text()) for k in (1, 2))
    assert (d1["action"], d2["action"]) == ("continue", "finish")
    status = json.loads(birdbone("status", str(run), "--json").stdout)
    assert status["finished"] and status["next"] is None and status["accepted_wave"] == 2
    gguf = run / "model-f16.gguf"
    assert gguf.read_bytes()[:4] == b"GGUF"
    metrics = json.loads((run / "metrics.json").read_text())
    assert abs(metrics["compressed"]["sparsity"] - 0.5) < 0.01

    oracle.wait(timeout=1200)
    oracle_log.close()
    assert oracle.returncode == 0, (tmp_path / "oracle.log").read_text()[-3000:]
    got, want = model_tensors(run / "pruned"), model_tensors(ref / "pruned")
    assert got.keys() == want.keys()
    assert [n for n in want if got[n] != want[n]] == []         # dtype, shape and bytes of every tensor


def test_too_aggressive_recipe_takes_the_rollback_branch(dagbag, airflow_db, runs_root, tmp_path):
    recipe = tmp_path / "aggressive.yaml"
    recipe.write_text(TOO_AGGRESSIVE)
    run = runs_root / "rollback"
    dr = dagbag.dags["birdbone_compress"].test(
        run_conf={"model": str(FIXTURE), "recipe": str(recipe), "run_id": "rollback"})
    st = _states(dr)
    assert str(dr.state.value if hasattr(dr.state, "value") else dr.state) == "success", st
    d = [json.loads((run / "waves" / str(k) / "decision.json").read_text()) for k in (1, 2)]
    assert [x["action"] for x in d] == ["continue", "rollback"], [x["reason"] for x in d]
    assert d[1]["accepted_wave"] == 1
    for t in ("wave_02.to_rollback", "rollback", "finish", "export", "evaluate"):
        assert st[t][0] == "success", (t, st[t])
    for t in ("wave_01.to_finish", "wave_02.to_finish", "wave_03.prune"):
        assert st[t][0] == "skipped", (t, st[t])
    # the final model is exactly the last accepted state, rebuilt from the ledger (hash-checked)
    accepted = tmp_path / "wave1"
    birdbone("revert", str(run), "--to", "1", "-o", str(accepted))
    got, want = model_tensors(run / "pruned"), model_tensors(accepted)
    assert [n for n in want if got.get(n) != want[n]] == []
    base = model_tensors(FIXTURE)
    assert any(got[n] != base[n] for n in base)                 # wave 1 did prune: not the base again


def test_targets_param_overrides_the_recipe(dagbag, runs_root, tmp_path):
    """`targets` writes a merged recipe copy under the runs root; init gets it, and birdbone validates it."""
    import yaml

    dag = dagbag.dags["birdbone_compress"]
    recipe = tmp_path / "base.yaml"
    recipe.write_text(TOO_AGGRESSIVE)
    params = {"model": str(FIXTURE), "recipe": str(recipe), "run_id": "targets",
              "targets": {"prune.sparsity": 0.4, "export.type": "q8_0", "waves.stop_loss.patience": 2}}
    merged = dag.get_task("resolve_recipe").python_callable(params=params, run_id="manual__x")
    assert merged == str(runs_root / "_recipes" / "targets.yaml")
    r = yaml.safe_load(open(merged))
    assert r["prune"] == {"method": "magnitude", "sparsity": 0.4}
    assert r["export"]["type"] == "q8_0" and r["waves"]["stop_loss"] == {"threshold": 0.05, "patience": 2}
    run = tmp_path / "run"
    birdbone("init", str(run), "--model", str(FIXTURE), "-r", merged)
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["prune"]["sparsity"] == 0.4 and saved["export"]["type"] == "q8_0"
    bad = dict(params, targets={"prune.sparsity.deeper": 1})
    with pytest.raises(Exception, match="non-mapping"):
        dag.get_task("resolve_recipe").python_callable(params=bad, run_id="manual__x")


def test_graph_shape(dagbag):
    """prepare -> wave groups in a chain; every stop-loss branches to next wave | rollback | finish."""
    dag = dagbag.dags["birdbone_compress"]
    waves = sorted({t.split(".")[0] for t in dag.task_dict if t.startswith("wave_")})
    assert waves == [f"wave_{k:02d}" for k in range(1, 11)]
    assert dag.get_task("prepare").downstream_task_ids == {"wave_01.prune"}
    for k in range(1, 11):
        g = f"wave_{k:02d}"
        for a, b in zip(("prune", "heal", "regrow", "evaluate", "decide", "publish"),
                        ("heal", "regrow", "evaluate", "decide", "publish", "stop_loss")):
            assert f"{g}.{b}" in dag.get_task(f"{g}.{a}").downstream_task_ids
        nxt = {f"wave_{k + 1:02d}.prune"} if k < 10 else set()
        assert dag.get_task(f"{g}.stop_loss").downstream_task_ids == {f"{g}.to_rollback", f"{g}.to_finish"} | nxt
        assert dag.get_task(f"{g}.to_rollback").downstream_task_ids == {"rollback"}
        assert dag.get_task(f"{g}.to_finish").downstream_task_ids == {"finish"}
    assert dag.get_task("rollback").downstream_task_ids == {"finish"}
    for t in ("rollback", "finish"):
        assert dag.get_task(t).trigger_rule == "none_failed_min_one_success"
    assert dag.get_task("evaluate").downstream_task_ids == {"report"}
    assert dag.get_task("report").downstream_task_ids == {"publish"}
