"""birdbone_compress without running it: the `targets` param's merged recipe, and the graph's shape.
The DAG runs end to end (a killed step retried, the rollback branch, the web UI) in the real Airflow of
test_airflow_server.py."""
from __future__ import annotations

from airflow_testlib import FIXTURE, REPO, birdbone, needs_cli
from tiny_recipes import TOO_AGGRESSIVE

pytestmark = needs_cli


def test_targets_param_reaches_init_as_one_json_argument(dagbag, runs_root, tmp_path):
    """`targets` renders into `init --targets=JSON` (no recipe copy on the worker); birdbone applies and
    validates it, and a path through a non-mapping is a user error (exit 2)."""
    import json
    from types import SimpleNamespace

    import yaml

    dag = dagbag.dags["birdbone_compress"]
    recipe = tmp_path / "base.yaml"
    recipe.write_text(TOO_AGGRESSIVE)
    targets = {"prune.sparsity": 0.4, "export.type": "q8_0", "waves.stop_loss.patience": 2}
    params = {**{k: v.value for k, v in dag.params.items()}, "model": str(FIXTURE), "recipe": str(recipe),
              "run_id": "targets", "targets": targets}
    op = dag.get_task("init").prepare_for_execution()
    ti = SimpleNamespace(dag_id=dag.dag_id, task_id="init", run_id="manual__x", try_number=1, map_index=-1)
    op.render_template_fields({"params": params, "run_id": "manual__x", "dag": dag, "ti": ti})
    argv = op.local_argv()[1:]
    flag = next(a for a in argv if a.startswith("--targets="))
    assert json.loads(flag.split("=", 1)[1]) == targets
    run = tmp_path / "run"
    birdbone("init", str(run), *argv[2:])
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["prune"]["sparsity"] == 0.4 and saved["export"]["type"] == "q8_0"
    assert saved["waves"]["stop_loss"]["patience"] == 2 and saved["waves"]["stop_loss"]["threshold"] == 0.05
    bad = birdbone("init", str(tmp_path / "bad"), "--model", str(FIXTURE), "-r", str(recipe),
                   '--targets={"prune.sparsity.deeper": 1}', check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "not a mapping" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_graph_shape(dagbag):
    """prepare -> wave groups in a chain; every stop-loss branches to next wave | rollback | finish."""
    dag = dagbag.dags["birdbone_compress"]
    waves = sorted({t.split(".")[0] for t in dag.task_dict if t.startswith("wave_")})
    assert waves == [f"wave_{k:02d}" for k in range(1, 11)]
    assert dag.get_task("prepare").downstream_task_ids == {"wave_01.prune"}
    for k in range(1, 11):
        g = f"wave_{k:02d}"
        for a, b in zip(("prune", "heal", "regrow", "evaluate"), ("heal", "regrow", "evaluate", "decide")):
            assert dag.get_task(f"{g}.{a}").downstream_task_ids == {f"{g}.{b}"}
        # publish hangs off decide, beside the branch: a publish failure never blocks the next wave
        assert dag.get_task(f"{g}.decide").downstream_task_ids == {f"{g}.stop_loss", f"{g}.publish"}
        assert dag.get_task(f"{g}.publish").downstream_task_ids == set()
        assert dag.get_task(f"{g}.publish").retries >= 5
        nxt = {f"wave_{k + 1:02d}.prune"} if k < 10 else set()
        assert dag.get_task(f"{g}.stop_loss").downstream_task_ids == {f"{g}.to_rollback", f"{g}.to_finish"} | nxt
        assert dag.get_task(f"{g}.to_rollback").downstream_task_ids == {"rollback"}
        assert dag.get_task(f"{g}.to_finish").downstream_task_ids == {"finish"}
    assert dag.get_task("rollback").downstream_task_ids == {"finish"}
    for t in ("rollback", "finish"):
        assert dag.get_task(t).trigger_rule == "none_failed_min_one_success"
    assert dag.get_task("evaluate").downstream_task_ids == {"report"}
    assert dag.get_task("report").downstream_task_ids == {"publish"}


def test_wave_slots_follow_the_environment(monkeypatch, tmp_path):
    """BIRDBONE_WAVE_SLOTS sizes the graph (one slot: its branch has no next wave); a bad value fails the
    parse with a message naming it; run_local gives a one-shot recipe one slot and a wave recipe all."""
    import importlib.util
    import sys

    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("BIRDBONE_WAVE_SLOTS", "1")
    dag = DagBag(dag_folder=str(REPO / "dags" / "birdbone_compress.py")).dags["birdbone_compress"]
    assert sorted({t.split(".")[0] for t in dag.task_dict if t.startswith("wave_")}) == ["wave_01"]
    assert dag.get_task("wave_01.stop_loss").downstream_task_ids == {"wave_01.to_rollback", "wave_01.to_finish"}
    monkeypatch.setenv("BIRDBONE_WAVE_SLOTS", "0")
    bag = DagBag(dag_folder=str(REPO / "dags" / "birdbone_compress.py"))
    assert "birdbone_compress" not in bag.dags
    assert "BIRDBONE_WAVE_SLOTS" in str(bag.import_errors)

    spec = importlib.util.spec_from_file_location("run_local", REPO / "dags" / "run_local.py")
    run_local = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "argv", ["run_local"])
    spec.loader.exec_module(run_local)
    (tmp_path / "one.yaml").write_text("prune: {method: magnitude, sparsity: 0.5}\n")
    (tmp_path / "waves.yaml").write_text("prune: {sparsity: 0.5}\nwaves: {max_per_wave: 0.1}\n")
    assert not run_local.recipe_has_waves(tmp_path / "one.yaml")
    assert run_local.recipe_has_waves(tmp_path / "waves.yaml")
    assert not run_local.recipe_has_waves(REPO / "birdbone_core" / "recipes" / "demo.yaml")
    assert run_local.size_targets(" 40% ") == {"quantize.target_size": "40%"}      # make demo SIZE=40%
    assert run_local.size_targets("") == {}


def test_step_kinds_pools_and_timeouts(dagbag):
    """GPU steps take the h100 pool and a long timeout; CPU steps a short one; decide returns its
    decision as an XCom; the heal step is the distributed one; every task reports to the Pushgateway."""
    from operators import signals
    from operators.birdbone_step import GPU_POOL, STEP_KINDS

    dag = dagbag.dags["birdbone_compress"]
    gpu = {"prepare", "export"} | {f"wave_{k:02d}.{s}" for k in range(1, 11)
                                   for s in ("prune", "heal", "regrow", "evaluate")}
    steps = {t.task_id: t for t in dag.tasks if type(t).__name__ == "BirdboneStepOperator"}
    assert gpu < set(steps)
    for tid, t in steps.items():
        kind = "gpu" if tid in gpu else "cpu"
        assert t.step_kind == kind, tid
        assert t.execution_timeout == STEP_KINDS[kind].execution_timeout, tid
        assert (t.pool == GPU_POOL) == (kind == "gpu"), tid
        assert t.do_xcom_push == tid.endswith(".decide"), tid
        assert t.distributed == tid.endswith(".heal"), tid
    assert steps["evaluate"].step_kind == "cpu"           # the final evaluation scores the GGUF
    for t in dag.tasks:
        assert t.on_failure_callback and signals.on_failure in list(t.on_failure_callback), t.task_id
    assert dag.on_failure_callback and dag.on_success_callback
