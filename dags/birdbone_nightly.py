"""birdbone_nightly: every night, compress each checkpoint in the watched folder that has not been
compressed with the current recipe yet, by triggering one birdbone_compress run per new checkpoint.

A checkpoint is a directory with config.json (Hugging Face layout) or a .gguf file directly in the watched
folder. Its key is (name, fingerprint of its files: names, sizes, mtimes) + the recipe's sha256, so a new
or changed checkpoint, or a changed recipe, gives a new key. The key names both the run directory and the
birdbone_compress run id; a key whose run directory exists is not new, and the trigger skips a run id that
already exists, so re-running this DAG (or a backfill) triggers nothing twice.
"""
from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG, Param, task
from airflow.sdk.exceptions import AirflowFailException

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from operators import settings

COMPRESS_DAG_ID = "birdbone_compress"


def checkpoint_fingerprint(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def recipe_sha256(recipe: str) -> str:
    """sha256 of the recipe file's bytes ('default' for birdbone's built-in recipe)."""
    if not recipe:
        return hashlib.sha256(b"default").hexdigest()
    p = Path(recipe)
    if not p.is_file():
        raise AirflowFailException(f"{p}: recipe file not found")
    return hashlib.sha256(p.read_bytes()).hexdigest()


def find_checkpoints(watch_dir: Path) -> list[Path]:
    if not watch_dir.is_dir():
        raise AirflowFailException(f"{watch_dir}: watched checkpoint folder does not exist")
    found = [p for p in sorted(watch_dir.iterdir()) if not p.name.startswith(".")
             and ((p.is_dir() and (p / "config.json").is_file()) or (p.is_file() and p.suffix == ".gguf"))]
    return found


def plan_runs(watch_dir: Path, recipe: str, runs_root: Path) -> list[dict]:
    """One birdbone_compress trigger per checkpoint not compressed yet with this recipe."""
    r = recipe_sha256(recipe)[:12]
    out = []
    for ckpt in find_checkpoints(watch_dir):
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", ckpt.stem if ckpt.is_file() else ckpt.name).strip("._-")[:60]
        name = f"{slug or 'model'}-{checkpoint_fingerprint(ckpt)[:12]}-r{r}"
        if (runs_root / name / "run.json").is_file():
            continue      # this checkpoint was already run with this recipe (or is running)
        out.append({"trigger_run_id": f"nightly__{name}",
                    "conf": {"model": str(ckpt.resolve()), "recipe": recipe, "run_id": name}})
    return out


with DAG(
    dag_id="birdbone_nightly",
    description="Nightly: compress new checkpoints from the watched folder with the current recipe",
    schedule="0 2 * * *",
    catchup=False,
    max_active_runs=1,
    tags=["birdbone"],
    doc_md=__doc__,
    params={
        "watch_dir": Param("", type=["string", "null"], title="Watched folder",
                           description="checkpoints to compress; empty = Variable birdbone_watch_dir"),
        "recipe": Param("", type=["string", "null"], title="Recipe",
                        description="recipe YAML; empty = Variable birdbone_nightly_recipe (else the default)"),
    },
) as dag:

    @task
    def find_new_checkpoints(params=None) -> list[dict]:
        watch = params.get("watch_dir") or settings.variable("birdbone_watch_dir", "")
        if not watch:
            raise AirflowFailException("no watched folder: set the watch_dir param or Variable birdbone_watch_dir")
        recipe = params.get("recipe") or settings.variable("birdbone_nightly_recipe", "")
        runs = plan_runs(Path(watch), recipe, settings.runs_root())
        for r in runs:
            print(f"new checkpoint: {r['conf']['model']} -> {r['trigger_run_id']}")
        print(f"{len(runs)} checkpoint(s) to compress")
        return runs

    TriggerDagRunOperator.partial(
        task_id="trigger_compress", trigger_dag_id=COMPRESS_DAG_ID, skip_when_already_exists=True,
        wait_for_completion=False,
    ).expand_kwargs(find_new_checkpoints())
