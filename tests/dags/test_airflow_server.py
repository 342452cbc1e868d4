"""A real Airflow (api-server, scheduler, dag-processor, triggerer; SQLite; 127.0.0.1 only) runs
birdbone_compress twice on the fixture model: once triggered through the REST API, once through the web UI
in headless chromium (sign in, open the DAG, fill the params form, trigger). Both runs must succeed and
each must leave its GGUF in the run directory named by the params."""
from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest

from airflow_server import PASSWORD, AirflowServer
from airflow_testlib import FIXTURE, REPO, birdbone, needs_cli

UI = REPO / "tests" / "dags" / "ui"
ONE_SHOT = """
name: af-oneshot
calibration: {n_samples: 4, seq_len: 64}
evaluation: {n_ctx: 64, max_chunks: 2}
prune: {method: magnitude, sparsity: 0.5}
export: {type: f16}
"""

pytestmark = [
    needs_cli,
    pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed (make sysdeps)"),
    pytest.mark.skipif(not (UI / "node_modules" / "playwright-core").is_dir() or shutil.which("node") is None,
                       reason="playwright-core not installed (cd tests/dags/ui && npm ci)"),
]


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    srv = AirflowServer(tmp_path_factory.mktemp("airflow-server"), REPO / "dags")
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def test_rest_and_ui_triggered_runs_succeed(airflow, runs_root, tmp_path):
    recipe = tmp_path / "oneshot.yaml"
    recipe.write_text(ONE_SHOT)
    airflow.wait_for_dag("birdbone_compress")
    airflow.request("PATCH", "/api/v2/dags/birdbone_compress", {"is_paused": False})

    # 1. REST
    rest_conf = {"model": str(FIXTURE), "recipe": str(recipe), "run_id": "srv-rest"}
    rest = airflow.request("POST", "/api/v2/dags/birdbone_compress/dagRuns",
                           {"logical_date": None, "conf": rest_conf})

    # 2. the web UI
    ui_params = {"model": str(FIXTURE), "recipe": str(recipe), "run_id": "srv-ui"}
    shots = tmp_path / "screenshots"
    shots.mkdir()
    r = subprocess.run(["node", str(UI / "trigger_dag.js"), airflow.url, "admin", PASSWORD, "birdbone_compress",
                        json.dumps(ui_params), str(shots)], cwd=UI, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["ok"]
    deadline = time.time() + 60
    ui_run = None
    while ui_run is None and time.time() < deadline:
        runs = airflow.get("/api/v2/dags/birdbone_compress/dagRuns?limit=100")["dag_runs"]
        ui_run = next((x for x in runs if (x.get("conf") or {}).get("run_id") == "srv-ui"), None)
        time.sleep(1)
    assert ui_run is not None, "the UI trigger created no run"
    assert {k: ui_run["conf"][k] for k in ui_params} == ui_params        # the form's params reached the run

    ids = [rest["dag_run_id"], ui_run["dag_run_id"]]
    states = airflow.wait_for_runs("birdbone_compress", ids, timeout=1200)
    detail = {i: airflow.task_states("birdbone_compress", i) for i in ids if states[i] != "success"}
    assert states == {i: "success" for i in ids}, detail
    for name in ("srv-rest", "srv-ui"):
        run = runs_root / name
        assert (run / "model-f16.gguf").read_bytes()[:4] == b"GGUF"
        status = json.loads(birdbone("status", str(run), "--json").stdout)
        assert status["finished"] and status["waves"] == 1
        tasks = airflow.task_states("birdbone_compress", ids[0] if name == "srv-rest" else ids[1])
        assert tasks["wave_01.stop_loss"] == "success" and tasks["wave_02.prune"] == "skipped"
