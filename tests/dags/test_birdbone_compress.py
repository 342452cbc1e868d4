"""birdbone_compress without running it: the `targets` param's merged recipe, and the graph's shape.
The DAG runs end to end (a killed step retried, the rollback branch, the web UI) in the real Airflow of
test_airflow_server.py."""
from __future__ import annotations

import pytest
from airflow_testlib import FIXTURE, birdbone, needs_cli
from tiny_recipes import TOO_AGGRESSIVE

pytestmark = needs_cli


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
