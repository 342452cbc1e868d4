"""`birdbone tasks TARGET`: task accuracy (lm-eval) and canaries of a model, a GGUF, or a run.

    birdbone tasks RUN                         # base vs RUN/pruned on the recipe's tasks -> RUN/tasks.json
    birdbone tasks RUN --gguf                  # ... vs the run's exported GGUF (llama.cpp)
    birdbone tasks MODEL [--base BASE] [--tasks pydocs_cloze,arc_easy] [--limit N] [-r RECIPE] [--json]

MODEL is a Hugging Face directory (torch) or a .gguf file (llama.cpp). Tasks default to the recipe's
`evaluation.tasks`, else the shipped offline tasks. Canaries come from the recipe (`-r`, or the run's).
"""
from __future__ import annotations

import json
from pathlib import Path

from birdbone_core.cliargs import add_runtime_flags, positive_int


def _adapter(spec: str, a, placement, own: bool = False):
    """A scoring adapter for a model spec: .gguf -> llama.cpp, anything else -> torch, on `placement`
    (own: a run's pruned weights, which keep their stored dtype)."""
    from birdbone_core.eval.adapters import LlamaCppLM, TorchLM
    from birdbone_core.model.load import load_model

    if spec.lower().endswith(".gguf") and Path(spec).is_file() and a.engine != "torch":
        return LlamaCppLM(spec, n_ctx=a.n_ctx)
    return TorchLM(load_model(spec, allow_pickle=a.allow_pickle, trust_remote_code=a.trust_remote_code,
                              offline=not a.online, placement=placement, keep_dtype=own))


def _close(adapter) -> None:
    if hasattr(adapter, "close"):
        adapter.close()


def _plan(a):
    """(target spec, base spec or None, Evaluation settings, output file or None, the recipe's runtime)."""
    from birdbone_core.errors import BirdboneError
    from birdbone_core.recipe import load_recipe
    from birdbone_core.steps import Run

    root = Path(a.target)
    out = Path(a.out) if a.out else None
    if (root / "run.json").is_file():
        run = Run(root)
        recipe = run.recipe() if not a.recipe else load_recipe(a.recipe)
        if a.gguf:
            target = run.gguf_path(recipe)
            if not target.is_file():
                raise BirdboneError(f"{root}: no exported GGUF {target.name}; `birdbone tasks --gguf` needs step export first")
        else:
            target = run.pruned_dir
            if not (target / "config.json").is_file():
                raise BirdboneError(f"{root}: no pruned model in {target}; `birdbone tasks` needs step finish first")
        base = a.base or run.base_spec()
        out = out or root / "tasks.json"
        return str(target), base, recipe.evaluation, out, recipe.runtime
    recipe = load_recipe(a.recipe)
    return a.target, a.base, recipe.evaluation, out, recipe.runtime


def _is_task_result(path: Path) -> bool:
    """A JSON file `birdbone tasks` wrote (so -o may replace it)."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and isinstance(d.get("tasks"), list) and "model_report" in d


def _cmd_tasks(a) -> int:
    from birdbone_core import atomic
    from birdbone_core.cliargs import runtime_of
    from birdbone_core.eval.tasks import OFFLINE_TASKS, accuracy_report, compare, load_tasks
    from birdbone_core.runtime import place

    target, base, ev, out, runtime = _plan(a)
    placement = place(runtime_of(a), runtime)          # a missing device: refused before any model loads
    own = (Path(a.target) / "run.json").is_file() and not a.gguf
    if out is not None:
        atomic.check_output_file(out, "task results", _is_task_result)
    tasks = [t for t in a.tasks.split(",") if t] if a.tasks else (list(ev.tasks) or list(OFFLINE_TASKS))
    ev = ev.model_copy(update={"tasks": tasks, "task_limit": a.limit if a.limit else ev.task_limit})
    load_tasks(tasks, a.online)   # fail on missing data before loading any model
    result: dict = {"tasks": tasks, "limit": ev.task_limit, "model": target, "base": base}
    for role, spec in (("base", base), ("model", target)):
        if spec is None:
            continue
        adapter = _adapter(spec, a, placement, own=own and role == "model")
        try:
            result[f"{role}_report"] = accuracy_report(adapter, ev, a.online)
        finally:
            _close(adapter)
    if base is not None:
        result["deltas"] = compare(result["base_report"], result["model_report"])
    if out is not None:
        atomic.write_json(out, result)
    if a.json:
        print(json.dumps(result, indent=1))
    else:
        _print(result)
        if out is not None:
            print(f"written: {out}")
    return 0


def _print(result: dict) -> None:
    from birdbone_core.eval.canaries import CanaryResult, summary

    m = result["model_report"]
    b = result.get("base_report")
    print(f"{'task':<18} {'metric':<8} {'n':>5} {'chance':>6} " + (f"{'base':>16} " if b else "")
          + f"{'model':>16}" + (f" {'delta':>16}" if b else ""))
    for task, r in m["tasks"].items():
        k = r["primary"]
        chance = "-" if r.get("chance") is None else f"{r['chance']:.0%}"
        line = f"{task:<18} {k:<8} {r['n'] or 0:>5} {chance:>6} "
        if b:
            br = b["tasks"][task]
            line += f"{br[k]:>8.3f} ± {br.get(k + '_stderr', 0):.3f} "
        line += f"{r[k]:>8.3f} ± {r.get(k + '_stderr', 0):.3f}"
        if b:
            d = next(x for x in result["deltas"] if x["task"] == task)
            line += f" {d['delta']:>+8.3f} ± {d['delta_stderr']:.3f}"
        print(line)
    for role, rep in (("base", b), ("model", m)):
        if rep and rep["canaries"]:
            results = [CanaryResult(**c) for c in rep["canaries"]]
            print(f"{role} {summary(results)}")
            for c in results:
                if not c.passed:
                    print(f"  FAILED {c.name}: {c.detail}")


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("tasks", help="task accuracy (lm-eval) and canaries of a model, GGUF or run")
    p.add_argument("target", help="run directory, HF model directory, or .gguf file")
    p.add_argument("--base", help="base model to compare with (default for a run: its input model)")
    p.add_argument("--tasks", help="comma-separated lm-eval task names (default: recipe's, else offline tasks)")
    p.add_argument("--limit", type=positive_int, help="documents per task (default: recipe's task_limit, else all)")
    p.add_argument("-r", "--recipe", help="recipe whose evaluation section gives tasks and canaries")
    p.add_argument("--gguf", action="store_true", help="for a run: score its exported GGUF (llama.cpp)")
    p.add_argument("--engine", choices=("auto", "torch"), default="auto",
                   help="auto: .gguf files run in llama.cpp; torch: dequantize them instead")
    p.add_argument("--n-ctx", type=positive_int, default=1024, help="llama.cpp context for GGUF scoring")
    p.add_argument("-o", "--out", help="write the JSON result here (default for a run: RUN/tasks.json)")
    p.add_argument("--json", action="store_true", help="print JSON")
    g = p.add_argument_group("model loading and data (all off by default)")
    g.add_argument("--allow-pickle", action="store_true")
    g.add_argument("--trust-remote-code", action="store_true")
    g.add_argument("--online", action="store_true", help="allow downloading models and task datasets")
    add_runtime_flags(p)
    p.set_defaults(fn=_cmd_tasks)
