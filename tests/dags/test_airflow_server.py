"""A real Airflow (api-server, scheduler, dag-processor, triggerer; SQLite; 127.0.0.1 only) runs
birdbone_compress three times on the fixture model, all at once (each run is a chain of one-thread step
processes, so concurrent runs use the cores a single run leaves idle):

  REST  srv-kill      two waves with healing; the wave-1 heal process is SIGKILLed mid-step and Airflow
                      must retry it: the result must equal an uninterrupted `birdbone run`, bit for bit
  REST  srv-rollback  a too-aggressive recipe that must take the rollback branch: the final model must
                      equal the last accepted wave's state, rebuilt from the ledger
  UI    srv-ui        a one-shot recipe triggered through the web UI in headless chromium (sign in, open
                      the DAG, fill the params form, trigger)

Every run must succeed and leave its GGUF in the run directory named by the params."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from types import SimpleNamespace

import psutil
import pytest
from airflow_server import PASSWORD, AirflowServer
from airflow_testlib import BIRDBONE, FIXTURE, REPO, birdbone, model_tensors, needs_cli
from tiny_recipes import TOO_AGGRESSIVE, tiny_recipe, waves

UI = REPO / "tests" / "dags" / "ui"
DAG = "birdbone_compress"
ONE_SHOT = tiny_recipe("af-oneshot", {"method": "magnitude", "sparsity": 0.5}, n_samples=4, max_chunks=2)
WAVES = tiny_recipe("af-waves", {"method": "wanda", "sparsity": 0.5},
                    waves=waves(0.25, {"method": "blockwise", "steps": 5, "lr": 1.0e-3}, threshold=1.0, patience=2))

pytestmark = needs_cli
needs_chromium = pytest.mark.skipif(shutil.which("chromium") is None,
                                    reason="Debian chromium not installed (make sysdeps)")
needs_playwright = pytest.mark.skipif(
    not (UI / "node_modules" / "playwright-core").is_dir() or shutil.which("node") is None,
    reason="playwright-core not installed (cd tests/dags/ui && npm ci)")


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    srv = AirflowServer(tmp_path_factory.mktemp("airflow-server"), REPO / "dags")
    try:
        srv.start()
        srv.wait_for_dag(DAG)
        srv.request("PATCH", f"/api/v2/dags/{DAG}", {"is_paused": False})
        yield srv
    finally:
        srv.stop()


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



@pytest.fixture(scope="module")
def rest_runs(airflow, runs_root, tmp_path_factory):
    """Triggers srv-kill and srv-rollback through the REST API, starts the killer and srv-kill's oracle (the
    same recipe, uninterrupted, every step in one process: `birdbone run`, 1 thread) and returns at once:
    the web-UI run goes on while these run."""
    d = tmp_path_factory.mktemp("rest-runs")
    (d / "waves.yaml").write_text(WAVES)
    (d / "aggressive.yaml").write_text(TOO_AGGRESSIVE)
    ref = d / "ref"
    oracle_log = open(d / "oracle.log", "w")
    oracle = subprocess.Popen(f"'{BIRDBONE}' init '{ref}' --model '{FIXTURE}' -r '{d / 'waves.yaml'}' && "
                              f"'{BIRDBONE}' run '{ref}'", shell=True, stdout=oracle_log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    killer = _KillOnce(runs_root / "srv-kill", 1, "heal")
    killer.start()
    ids = {}
    for name, recipe in (("srv-kill", d / "waves.yaml"), ("srv-rollback", d / "aggressive.yaml")):
        conf = {"model": str(FIXTURE), "recipe": str(recipe), "run_id": name}
        ids[name] = airflow.request("POST", f"/api/v2/dags/{DAG}/dagRuns",
                                    {"logical_date": None, "conf": conf})["dag_run_id"]
    try:
        yield SimpleNamespace(ids=ids, killer=killer, oracle=oracle, oracle_log=d / "oracle.log", ref=ref)
    finally:
        killer.stop.set()
        if oracle.poll() is None:
            os.killpg(oracle.pid, signal.SIGKILL)
            oracle.wait()
        oracle_log.close()


def _assert_finished(run, waves: int) -> None:
    assert (run / "model-f16.gguf").read_bytes()[:4] == b"GGUF"
    status = json.loads(birdbone("status", str(run), "--json").stdout)
    assert status["finished"] and status["next"] is None and status["waves"] == waves, status


@needs_chromium
@needs_playwright
def test_ui_triggered_run_succeeds(airflow, rest_runs, runs_root, tmp_path):
    """Runs while the REST runs go on (rest_runs only starts them)."""
    recipe = tmp_path / "oneshot.yaml"
    recipe.write_text(ONE_SHOT)
    ui_params = {"model": str(FIXTURE), "recipe": str(recipe), "run_id": "srv-ui"}
    shots = tmp_path / "screenshots"
    shots.mkdir()
    r = subprocess.run(["node", str(UI / "trigger_dag.js"), airflow.url, "admin", PASSWORD, DAG,
                        json.dumps(ui_params), str(shots)], cwd=UI, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["ok"]
    deadline = time.time() + 60
    ui_run = None
    while ui_run is None and time.time() < deadline:
        runs = airflow.get(f"/api/v2/dags/{DAG}/dagRuns?limit=100")["dag_runs"]
        ui_run = next((x for x in runs if (x.get("conf") or {}).get("run_id") == "srv-ui"), None)
        time.sleep(1)
    assert ui_run is not None, "the UI trigger created no run"
    assert {k: ui_run["conf"][k] for k in ui_params} == ui_params        # the form's params reached the run

    run_id = ui_run["dag_run_id"]
    states = airflow.wait_for_runs(DAG, [run_id], timeout=1200)
    tasks = airflow.task_states(DAG, run_id)
    assert states[run_id] == "success", tasks
    _assert_finished(runs_root / "srv-ui", waves=1)
    assert tasks["wave_01.stop_loss"] == "success" and tasks["wave_02.prune"] == "skipped"


def test_rest_runs_survive_a_killed_step_and_roll_back(airflow, rest_runs, runs_root, tmp_path):
    ids = rest_runs.ids
    states = airflow.wait_for_runs(DAG, list(ids.values()), timeout=1200)
    rest_runs.killer.stop.set()
    detail = {i: airflow.task_states(DAG, i) for i in ids.values() if states[i] != "success"}
    assert states == {i: "success" for i in ids.values()}, detail

    # srv-kill: the heal step was killed once and retried by Airflow; the run equals the oracle's
    run = runs_root / "srv-kill"
    st = airflow.task_instances(DAG, ids["srv-kill"])
    assert rest_runs.killer.killed is not None, "the heal step finished before it could be killed"
    assert st["wave_01.heal"] == ("success", 2)               # failed once (SIGKILL), retried by Airflow
    for t in ("init", "prepare", "finish", "export", "evaluate", "report", "wave_02.decide", "wave_02.to_finish",
              "wave_01.publish", "publish"):     # publish param false: the publish tasks run and do nothing
        assert st[t][0] == "success", (t, st[t])
    assert (run / "report" / "report.md").is_file()
    for t in ("rollback", "wave_01.to_rollback", "wave_02.to_rollback", "wave_03.prune", "wave_10.stop_loss"):
        assert st[t][0] == "skipped", (t, st[t])
    d1, d2 = (json.loads((run / "waves" / str(k) / "decision.json").read_text()) for k in (1, 2))
    assert (d1["action"], d2["action"]) == ("continue", "finish")
    _assert_finished(run, waves=2)
    assert json.loads(birdbone("status", str(run), "--json").stdout)["accepted_wave"] == 2
    metrics = json.loads((run / "metrics.json").read_text())
    assert abs(metrics["compressed"]["sparsity"] - 0.5) < 0.01
    rest_runs.oracle.wait(timeout=1200)
    assert rest_runs.oracle.returncode == 0, rest_runs.oracle_log.read_text()[-3000:]
    got, want = model_tensors(run / "pruned"), model_tensors(rest_runs.ref / "pruned")
    assert got.keys() == want.keys()
    assert [n for n in want if got[n] != want[n]] == []         # dtype, shape and bytes of every tensor

    # srv-rollback: wave 1 accepted, wave 2 rolled back; the final model is wave 1's state
    run = runs_root / "srv-rollback"
    st = airflow.task_states(DAG, ids["srv-rollback"])
    d = [json.loads((run / "waves" / str(k) / "decision.json").read_text()) for k in (1, 2)]
    assert [x["action"] for x in d] == ["continue", "rollback"], [x["reason"] for x in d]
    assert d[1]["accepted_wave"] == 1
    for t in ("wave_02.to_rollback", "rollback", "finish", "export", "evaluate"):
        assert st[t] == "success", (t, st[t])
    for t in ("wave_01.to_finish", "wave_02.to_finish", "wave_03.prune"):
        assert st[t] == "skipped", (t, st[t])
    _assert_finished(run, waves=2)
    # the final model is exactly the last accepted state, rebuilt from the ledger (hash-checked)
    accepted = tmp_path / "wave1"
    birdbone("revert", str(run), "--to", "1", "-o", str(accepted))
    got, want = model_tensors(run / "pruned"), model_tensors(accepted)
    assert [n for n in want if got.get(n) != want[n]] == []
    base = model_tensors(FIXTURE)
    assert any(got[n] != base[n] for n in base)                 # wave 1 did prune: not the base again
