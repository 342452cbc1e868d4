"""birdbone_compress: one model, one recipe, one run directory; every `birdbone` step is its own task.

    init -> prepare -> wave_01 [prune -> heal -> regrow -> evaluate -> decide -> stop_loss]
         -> wave_02 ... (stop_loss: next wave | rollback | finish)
         -> rollback (only when a stop-loss asked for it) -> finish -> export -> evaluate -> report -> publish
    each wave's decide -> publish (beside the chain: an S3 outage retries there and never stops the waves)

GPU steps (prepare, prune, heal, regrow, the wave's evaluate, export) run with the CUDA image on an H100
node, pass `--device`, and take slots of the `h100` pool; the rest run in CPU pods (operators/birdbone_step.py).
The decide step's decision reaches the stop-loss branch as an XCom, so no task reads the run directory
on the Airflow worker. `publish` tasks push what is new to S3-backed DVC; with the `publish` param false
they do nothing (`birdbone publish --enabled=False`).

The recipe decides how many waves run (at most MAX_WAVES slots, $BIRDBONE_WAVE_SLOTS or 10;
unused slots are skipped by the branch).
Each task calls one step of the CLI contract on RUN = <Variable birdbone_runs_root>/<run id>, locally or in
a Kubernetes pod (operators/settings.py). Steps are idempotent and atomic, so retries are safe. Every task
pushes its state to the Pushgateway (operators/signals.py); a finished run's groups are cleaned up.
"""
from __future__ import annotations

import re
import sys
from datetime import timedelta
from pathlib import Path

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, Param, TaskGroup
from airflow.sdk.exceptions import AirflowFailException

# Airflow puts only the DAGs folder on sys.path; operators/ sits next to it (here and in the image)
if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from operators import BirdboneStepOperator, StopLossBranchOperator, settings, signals

DAG_ID = "birdbone_compress"
MAX_WAVES = settings.wave_slots()   # wave slots in the graph; a recipe needing more fails at the last slot's branch
WAVE_STEPS = ("prune", "heal", "regrow", "evaluate", "decide")
_RUN_ID_OK = r"^[A-Za-z0-9._-]{0,100}$"
# publishing retries longer and apart: it is off the critical path, and an S3 outage usually passes
PUBLISH_RETRIES = {"retries": 6, "retry_delay": timedelta(minutes=1), "retry_exponential_backoff": True}


def run_name(params: dict, run_id: str) -> str:
    """The run directory's name: the `run_id` param, else the Airflow run id made path-safe."""
    name = (params.get("run_id") or "").strip() or re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("._-")
    if not re.match(_RUN_ID_OK, name) or not name:
        raise AirflowFailException(f"run_id {name!r}: use letters, digits, '.', '_' or '-'")
    return name


def run_dir(params: dict, run_id: str) -> str:
    return str(settings.runs_root() / run_name(params, run_id))


with DAG(
    dag_id=DAG_ID,
    description="Prune, heal and quantize one model into a GGUF, wave by wave, with a stop-loss",
    schedule=None,
    catchup=False,
    max_active_runs=4,
    tags=["birdbone"],
    doc_md=__doc__,
    user_defined_macros={"birdbone_run_dir": run_dir},
    default_args={"retries": 2, "retry_delay": timedelta(seconds=15), **signals.TASK_CALLBACKS},
    **signals.RUN_CALLBACKS,
    params={
        "model": Param("", type=["string", "null"], title="Model",
                       description="HF directory, .gguf file, s3:// checkpoint prefix or hub id; "
                                   "empty = the built-in Gemma 3 270M"),
        "recipe": Param("", type=["string", "null"], title="Recipe",
                        description="path to a recipe YAML; empty = birdbone's default recipe"),
        "run_id": Param("", type=["string", "null"], title="Run id", pattern=_RUN_ID_OK,
                        description="run directory name under the runs root; empty = the Airflow run id"),
        "targets": Param({}, type=["object", "null"], title="Targets",
                         description='recipe overrides by dotted path, e.g. {"prune.sparsity": 0.4, '
                                     '"export.type": "f16"} (passed to `birdbone init --targets`)'),
        "publish": Param(False, type="boolean", title="Publish",
                         description="push the run's artifacts with `birdbone publish` (DVC + S3) after "
                                     "every decided wave and at the end"),
    },
) as dag:
    RUN = "{{ birdbone_run_dir(params, run_id) }}"

    def step(task_id: str, args: list[str], kind: str = "cpu", **kw) -> BirdboneStepOperator:
        return BirdboneStepOperator(task_id=task_id, args=args, kind=kind, **kw)

    def publish() -> BirdboneStepOperator:
        return step("publish", ["publish", RUN, "--enabled={{ params.publish }}"], **PUBLISH_RETRIES)

    init = step("init", ["init", RUN, "--model={{ params.model or '' }}", "--recipe={{ params.recipe or '' }}",
                         "--targets={{ params.targets | tojson if params.targets else '' }}"])
    prepare = step("prepare", ["prepare", RUN], kind="gpu")
    rollback = step("rollback", ["rollback", RUN], trigger_rule="none_failed_min_one_success")
    finish = step("finish", ["finish", RUN], trigger_rule="none_failed_min_one_success")
    export = step("export", ["export", RUN], kind="gpu")
    final_eval = step("evaluate", ["evaluate", RUN])        # scores the GGUF: a CPU pod
    init >> prepare
    rollback >> finish >> export >> final_eval

    groups = []
    for k in range(1, MAX_WAVES + 1):
        with TaskGroup(group_id=f"wave_{k:02d}", tooltip=f"wave {k}: prune, heal, regrow, evaluate, decide") as g:
            chain = [step(s, ["wave", RUN, str(k), s], kind="cpu" if s == "decide" else "gpu",
                          result=s == "decide", distributed=s == "heal") for s in WAVE_STEPS]
            for a, b in zip(chain, chain[1:]):
                a >> b
            to_rollback = EmptyOperator(task_id="to_rollback")
            to_finish = EmptyOperator(task_id="to_finish")
            branch = StopLossBranchOperator(
                task_id="stop_loss", decide_task=f"wave_{k:02d}.decide", wave=k,
                next_wave=f"wave_{k + 1:02d}.prune" if k < MAX_WAVES else None,
                rollback=f"wave_{k:02d}.to_rollback", finish=f"wave_{k:02d}.to_finish")
            chain[-1] >> [branch, publish()]
            branch >> [to_rollback, to_finish]
            to_rollback >> rollback
            to_finish >> finish
        groups.append((chain[0], branch))
    prepare >> groups[0][0]
    for (_, branch), (next_first, _) in zip(groups, groups[1:]):
        branch >> next_first

    report = step("report", ["report", RUN])
    final_eval >> report >> publish()
