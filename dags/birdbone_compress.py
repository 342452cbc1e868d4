"""birdbone_compress: one model, one recipe, one run directory; every `birdbone` step is its own task.

    init -> prepare -> wave_01 [prune -> heal -> regrow -> evaluate -> decide -> publish -> stop_loss]
         -> wave_02 ... (stop_loss: next wave | rollback | finish)
         -> rollback (only when a stop-loss asked for it) -> finish -> export -> evaluate -> report -> publish

`publish` tasks push what is new to S3-backed DVC after every decided wave and at the end; with the
`publish` param false they do nothing (`birdbone publish --enabled=False`).

The recipe decides how many waves run (at most MAX_WAVES slots; unused slots are skipped by the branch).
Each task calls one step of the CLI contract on RUN = <Variable birdbone_runs_root>/<run id>, locally or in
a Kubernetes pod (operators/settings.py). Steps are idempotent and atomic, so retries are safe.
"""
from __future__ import annotations

import re
import sys
from datetime import timedelta
from pathlib import Path

import yaml
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, Param, TaskGroup, task
from airflow.sdk.exceptions import AirflowFailException

# Airflow puts only the DAGs folder on sys.path; operators/ sits next to it (here and in the image)
if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from operators import BirdboneStepOperator, StopLossBranchOperator, settings

DAG_ID = "birdbone_compress"
MAX_WAVES = 10        # wave slots in the graph; a recipe needing more fails at the last slot's branch
WAVE_STEPS = ("prune", "heal", "regrow", "evaluate", "decide")
_RUN_ID_OK = r"^[A-Za-z0-9._-]{0,100}$"


def run_name(params: dict, run_id: str) -> str:
    """The run directory's name: the `run_id` param, else the Airflow run id made path-safe."""
    name = (params.get("run_id") or "").strip() or re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("._-")
    if not re.match(_RUN_ID_OK, name) or not name:
        raise AirflowFailException(f"run_id {name!r}: use letters, digits, '.', '_' or '-'")
    return name


def run_dir(params: dict, run_id: str) -> str:
    return str(settings.runs_root() / run_name(params, run_id))


def recipe_for(params: dict, run_id: str) -> str:
    """The recipe `birdbone init` gets: the `recipe` param, or the merged copy when `targets` overrides it."""
    if params.get("targets"):
        return str(settings.runs_root() / "_recipes" / f"{run_name(params, run_id)}.yaml")
    return params.get("recipe") or ""


def merge_targets(recipe: dict, targets: dict) -> dict:
    """Apply {"prune.sparsity": 0.4, "export.type": "f16"} to a recipe mapping (birdbone validates it)."""
    out = yaml.safe_load(yaml.safe_dump(recipe))   # deep copy
    for dotted, value in targets.items():
        node = out
        *parents, leaf = str(dotted).split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise AirflowFailException(f"targets: {dotted!r} goes through a non-mapping field")
        node[leaf] = value
    return out


with DAG(
    dag_id=DAG_ID,
    description="Prune, heal and quantize one model into a GGUF, wave by wave, with a stop-loss",
    schedule=None,
    catchup=False,
    max_active_runs=4,
    tags=["birdbone"],
    doc_md=__doc__,
    user_defined_macros={"birdbone_run_dir": run_dir, "birdbone_recipe": recipe_for},
    default_args={"retries": 2, "retry_delay": timedelta(seconds=15)},
    params={
        "model": Param("", type=["string", "null"], title="Model",
                       description="HF directory, .gguf file or hub id; empty = the built-in Gemma 3 270M"),
        "recipe": Param("", type=["string", "null"], title="Recipe",
                        description="path to a recipe YAML; empty = birdbone's default recipe"),
        "run_id": Param("", type=["string", "null"], title="Run id", pattern=_RUN_ID_OK,
                        description="run directory name under the runs root; empty = the Airflow run id"),
        "targets": Param({}, type=["object", "null"], title="Targets",
                         description='recipe overrides by dotted path, e.g. {"prune.sparsity": 0.4, '
                                     '"export.type": "f16"}'),
        "publish": Param(False, type="boolean", title="Publish",
                         description="push the run's artifacts with `birdbone publish` (DVC + S3) after "
                                     "every decided wave and at the end"),
    },
) as dag:
    RUN = "{{ birdbone_run_dir(params, run_id) }}"

    @task
    def resolve_recipe(params=None, run_id=None) -> str:
        """Write the recipe with `targets` applied (a copy under the runs root, so pods can read it)."""
        out = recipe_for(params, run_id)
        if not params.get("targets"):
            return out
        base = {}
        if params.get("recipe"):
            src = Path(params["recipe"])
            if not src.is_file():
                raise AirflowFailException(f"{src}: recipe file not found")
            base = yaml.safe_load(src.read_text()) or {}
        merged = merge_targets(base, params["targets"])
        dest = Path(out)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        tmp.write_text(yaml.safe_dump(merged, sort_keys=False))
        tmp.replace(dest)
        return out

    def step(task_id: str, args: list[str], gpu: bool = False, **kw) -> BirdboneStepOperator:
        return BirdboneStepOperator(task_id=task_id, args=args, gpu=gpu, **kw)

    init = step("init", ["init", RUN, "--model={{ params.model or '' }}", "--recipe={{ birdbone_recipe(params, run_id) }}"])
    prepare = step("prepare", ["prepare", RUN], gpu=True)
    rollback = step("rollback", ["rollback", RUN], trigger_rule="none_failed_min_one_success")
    finish = step("finish", ["finish", RUN], trigger_rule="none_failed_min_one_success")
    export = step("export", ["export", RUN], gpu=True)
    final_eval = step("evaluate", ["evaluate", RUN], gpu=True)
    resolve_recipe() >> init >> prepare
    rollback >> finish >> export >> final_eval

    groups = []
    for k in range(1, MAX_WAVES + 1):
        with TaskGroup(group_id=f"wave_{k:02d}", tooltip=f"wave {k}: prune, heal, regrow, evaluate, decide") as g:
            chain = [step(s, ["wave", RUN, str(k), s], gpu=s != "decide") for s in WAVE_STEPS]
            chain.append(step("publish", ["publish", RUN, "--enabled={{ params.publish }}"]))
            for a, b in zip(chain, chain[1:]):
                a >> b
            to_rollback = EmptyOperator(task_id="to_rollback")
            to_finish = EmptyOperator(task_id="to_finish")
            branch = StopLossBranchOperator(
                task_id="stop_loss", run_dir=RUN, wave=k,
                next_wave=f"wave_{k + 1:02d}.prune" if k < MAX_WAVES else None,
                rollback=f"wave_{k:02d}.to_rollback", finish=f"wave_{k:02d}.to_finish")
            chain[-1] >> branch >> [to_rollback, to_finish]
            to_rollback >> rollback
            to_finish >> finish
        groups.append((chain[0], branch))
    prepare >> groups[0][0]
    for (_, branch), (next_first, _) in zip(groups, groups[1:]):
        branch >> next_first

    report = step("report", ["report", RUN])
    final_eval >> report >> step("publish", ["publish", RUN, "--enabled={{ params.publish }}"])
