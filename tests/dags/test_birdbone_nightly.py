"""birdbone_nightly triggers exactly one birdbone_compress run per new checkpoint, however often it runs:
nothing twice, a new checkpoint once, the same checkpoints again under a changed recipe."""
from __future__ import annotations

import importlib.util
import json
import os

from airflow_testlib import REPO


def _dag_module(name: str):
    spec = importlib.util.spec_from_file_location(f"_test_{name}", REPO / "dags" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _compress_runs() -> list:
    from airflow.models import DagRun
    from airflow.utils.session import create_session

    with create_session() as s:
        return sorted((r.run_id, json.dumps(r.conf, sort_keys=True))
                      for r in s.query(DagRun).filter(DagRun.dag_id == "birdbone_compress"))


def _nightly(dag, watch, recipe) -> str:
    dr = dag.test(run_conf={"watch_dir": str(watch), "recipe": str(recipe)})
    return str(getattr(dr.state, "value", dr.state))


def test_nightly_triggers_once_per_new_checkpoint(dagbag, airflow_db, runs_root, tmp_path):
    dag = dagbag.dags["birdbone_nightly"]
    watch = tmp_path / "checkpoints"
    (watch / "step-1000").mkdir(parents=True)
    (watch / "step-1000" / "config.json").write_text("{}")
    (watch / "step-1000" / "model.safetensors").write_bytes(b"\0" * 64)
    (watch / "not-a-checkpoint").mkdir()                       # no config.json: ignored
    (watch / "notes.txt").write_text("ignored")
    recipe = tmp_path / "nightly.yaml"
    recipe.write_text("name: nightly\nprune: {method: wanda, sparsity: 0.5}\n")
    before = _compress_runs()

    assert _nightly(dag, watch, recipe) == "success"
    first = [r for r in _compress_runs() if r not in before]
    assert len(first) == 1
    run_id, conf = first[0][0], json.loads(first[0][1])
    assert run_id.startswith("nightly__step-1000-")
    assert conf == {"model": str((watch / "step-1000").resolve()), "recipe": str(recipe),
                    "run_id": run_id.removeprefix("nightly__")}

    assert _nightly(dag, watch, recipe) == "success"          # again: nothing new
    assert [r for r in _compress_runs() if r not in before] == first

    (watch / "step-2000.gguf").write_bytes(b"GGUF" + b"\0" * 60)   # a new checkpoint appears
    assert _nightly(dag, watch, recipe) == "success"
    second = [r for r in _compress_runs() if r not in before]
    assert len(second) == 2 and first[0] in second
    assert any(r[0].startswith("nightly__step-2000-") for r in second)

    # a run directory of that checkpoint+recipe already exists (e.g. compressed before a DB reset):
    # not new either
    recipe.write_text("name: nightly\nprune: {method: wanda, sparsity: 0.6}\n")   # the recipe changes
    plan_runs = _dag_module("birdbone_nightly").plan_runs
    planned = plan_runs(watch, str(recipe), runs_root)
    assert len(planned) == 2
    done = runs_root / planned[0]["conf"]["run_id"]
    done.mkdir()
    (done / "run.json").write_text("{}")
    assert _nightly(dag, watch, recipe) == "success"
    third = [r for r in _compress_runs() if r not in before]
    assert len(third) == 3                                      # only the other checkpoint, once
    assert planned[1]["trigger_run_id"] in {r[0] for r in third}
    assert os.listdir(watch)                                    # checkpoints are only read, never moved
