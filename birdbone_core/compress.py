"""`birdbone compress` and `birdbone prune`: the one-shot steps (birdbone_core.steps) or, for a recipe
with `waves:`, the adaptive loop (birdbone_core.loop) up to its final weights. The choice is made here,
above both, so the steps and the loop never import each other.
"""
from __future__ import annotations

from pathlib import Path

from birdbone_core.loop.driver import prune_in_waves
from birdbone_core.model.load import LoadedModel
from birdbone_core.recipe import load_recipe
from birdbone_core.run import Run
from birdbone_core.run_init import init_run, load_model_for
from birdbone_core.runtime import Runtime, place
from birdbone_core.steps import step_baseline, step_evaluate, step_export, step_prune


def prune(run: Run, lm: LoadedModel | None = None) -> LoadedModel:
    """RUN/pruned/ and the ledger's waves: one-shot, or every wave of the loop (in this process)."""
    if run.recipe().waves is not None:
        return prune_in_waves(run, lm)
    return step_prune(run, lm)


def compress(root: Path, model_spec: str | None, recipe_file: str | None, load_options: dict | None = None,
             runtime: Runtime | None = None) -> dict:
    """All steps in one process on one loaded model (the model is pruned in place after the baseline).
    runtime: the command line's --device / --dtype (over the recipe's `runtime:`)."""
    placement = place(runtime, load_recipe(recipe_file).runtime)   # a missing device: refused before any work
    run = Run(init_run(root, model_spec, recipe_file, load_options).root, runtime)
    with run.locked("compress"):
        lm = load_model_for(run, placement)
        step_baseline(run, lm)
        prune(run, lm)
        step_export(run, lm)
        return step_evaluate(run, lm)
