"""Task accuracy with lm-evaluation-harness: the shipped offline tasks, and one entry point `run_tasks` for
either scorer of eval.adapters (a birdbone-loaded torch model, or a GGUF file in llama.cpp).

Both scorers score a (context, continuation) pair the way lm-eval's HFLM does: the context's trailing
spaces move to the continuation, context ids = encode(context) (BOS first when the tokenizer adds it),
continuation ids = encode(context + continuation)[len(context ids):]. The log-likelihood is the sum of
log p(continuation token | everything before); is_greedy = every continuation token is the argmax.
Only the continuation's positions go through the LM head, so a 262k vocabulary stays cheap.

Standard tasks (mmlu, arc_easy, arc_challenge, hellaswag, piqa, lambada_openai, ...) need their dataset
in the Hugging Face cache (or `online=True`); without it a BirdboneError names the task and the fix.
Nothing here waits on the network: HF_DATASETS_OFFLINE / HF_HUB_OFFLINE are set unless online.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import yaml

from birdbone_core.errors import BirdboneError
from birdbone_core.eval.adapters import ScoringLM, TorchLM

TASK_DIR = Path(__file__).resolve().parents[1] / "data" / "tasks"
OFFLINE_TASKS = ("pydocs_lastword", "pydocs_cloze")
# accuracy of guessing: the fraction of items a uniform random choice gets right (generative tasks ~0)
CHANCE = {"pydocs_lastword": 0.0, "pydocs_cloze": 0.25, "arc_easy": 0.25, "arc_challenge": 0.25,
          "hellaswag": 0.25, "mmlu": 0.25, "piqa": 0.5, "lambada_openai": 0.0, "lambada_standard": 0.0}
# the metric a task is judged by (the guardrail uses it); others default to "acc"
PRIMARY = {"hellaswag": "acc_norm", "arc_challenge": "acc_norm"}


def primary_metric(task: str) -> str:
    return PRIMARY.get(task, "acc")


def as_lm_eval(adapter: ScoringLM):
    """Wrap an adapter in lm-eval's LM base class (imported lazily: lm-eval is an optional extra)."""
    LM = _lm_eval().api.model.LM

    class _Adapter(LM):
        def __init__(self):
            super().__init__()
            self.inner = adapter

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return adapter.loglikelihood(requests)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return adapter.loglikelihood_rolling(requests)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return adapter.generate_until(requests)

    return _Adapter()


def _lm_eval(online: bool = False):
    if not online:  # read by `datasets` and `huggingface_hub` at import: set before lm_eval imports them
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import lm_eval
        import lm_eval.api.model
    except ImportError:
        raise BirdboneError("lm-eval is not installed: pip install 'birdbone-core[tasks]'") from None
    if not online:  # in case `datasets` / `huggingface_hub` were imported before the variables were set
        import datasets.config
        import huggingface_hub.constants

        datasets.config.HF_DATASETS_OFFLINE = True
        huggingface_hub.constants.HF_HUB_OFFLINE = True
    return lm_eval


def offline_task_config(name: str) -> dict:
    """The shipped task's YAML as a dict, with data_files made absolute (lm-eval resolves them from cwd)."""
    cfg = yaml.safe_load((TASK_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
    files = cfg["dataset_kwargs"]["data_files"]
    cfg["dataset_kwargs"]["data_files"] = {k: str(TASK_DIR / v) for k, v in files.items()}
    return cfg


def _dataset_of(task: str) -> str:
    """The HF dataset a registered lm-eval task reads ("" when its YAML does not say)."""
    try:
        entry = _manager().task_index.get(task)
        cfg = (entry.cfg if entry is not None and entry.cfg else
               yaml.load(entry.yaml_path.read_text(), Loader=yaml.BaseLoader))
        return f" {cfg['dataset_path']}" if cfg.get("dataset_path") else ""
    except Exception:  # tags, groups, includes: the name alone still tells the user what to fetch
        return ""


def _missing_data(task: str, exc: BaseException, online: bool) -> BirdboneError:
    what = f"its dataset{_dataset_of(task)}"
    how = (f"downloading {what} failed" if online else
           f"{what} is not in the Hugging Face cache and downloads are off")
    return BirdboneError(
        f"task {task!r}: {how} ({type(exc).__name__}); run once with --online (or "
        f"HF_DATASETS_OFFLINE=0) on a machine with internet to fill ~/.cache/huggingface, or use the offline "
        f"tasks {', '.join(OFFLINE_TASKS)}")


def load_tasks(names: list[str], online: bool = False) -> dict:
    """lm-eval task objects by name; every problem is a BirdboneError naming the task."""
    _lm_eval(online)
    from lm_eval.tasks import get_task_dict

    if not names:
        raise BirdboneError("no tasks given")
    out: dict = {}
    for name in names:
        try:
            with _quiet():
                if name in OFFLINE_TASKS:   # a Task straight from its config: no index of lm-eval's tasks
                    from lm_eval.api.task import ConfigurableTask
                    out[name] = ConfigurableTask(config=offline_task_config(name))
                    continue
                manager = _manager()
                if name not in manager.all_tasks:
                    raise BirdboneError(f"task {name!r}: unknown to lm-eval; offline tasks: {', '.join(OFFLINE_TASKS)}")
                out.update(get_task_dict([name], manager))
        except BirdboneError:
            raise
        except Exception as exc:  # datasets/hub raise many types when data is missing offline
            raise _missing_data(name, exc, online) from None
    return out


_MANAGER: list = []


def _manager():
    """lm-eval's task index (takes seconds to build: once per process)."""
    if not _MANAGER:
        from lm_eval.tasks import TaskManager
        _MANAGER.append(TaskManager(verbosity="ERROR"))
    return _MANAGER[0]


@contextlib.contextmanager
def _quiet():
    """lm-eval and datasets log at INFO/WARNING and print progress bars; keep the console readable."""
    levels = {n: logging.getLogger(n).level for n in ("lm-eval", "lm_eval", "datasets", "huggingface_hub")}
    for n in levels:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)   # lm-eval 0.4.13 deprecates get_task_dict
            yield
    finally:
        for n, lvl in levels.items():
            logging.getLogger(n).setLevel(lvl)


def run_tasks(adapter: ScoringLM, names: list[str], limit: int | None = None, online: bool = False,
              bootstrap_iters: int = 1000, per_doc: bool = False) -> dict[str, dict]:
    """Evaluate `adapter` on tasks -> {task: {metric: value, metric_stderr: s, "n": docs, "chance": c,
    "primary": metric}}. Group tasks (mmlu) report the group's aggregate under the group's name.
    per_doc: also "per_doc": the primary metric of every document in doc order (for paired deltas)."""
    task_dict = load_tasks(names, online)
    from lm_eval.evaluator import evaluate

    with _quiet():
        res = evaluate(lm=as_lm_eval(adapter), task_dict=task_dict, limit=limit,
                       bootstrap_iters=bootstrap_iters, log_samples=per_doc, verbosity="ERROR")
    out = _summarise(res, names)
    for name in names if per_doc else ():
        samples = sorted(res.get("samples", {}).get(name, []), key=lambda x: x["doc_id"])
        m = out[name]["primary"]
        out[name]["per_doc"] = [float(x[m]) for x in samples if m in x]
    return out


def paired_delta(base: list[float], other: list[float]) -> tuple[float, float]:
    """(mean(other - base), its stderr) over the same documents: tighter than unpaired stderrs,
    because most documents are right (or wrong) for both models."""
    if len(base) != len(other) or len(base) < 2:
        raise ValueError("paired delta needs the same documents (at least two) for both models")
    d = [o - b for b, o in zip(base, other)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
    return mean, (var / len(d)) ** 0.5


def _summarise(res: dict, names: list[str]) -> dict[str, dict]:
    out = {}
    results, n_samples = res.get("results", {}), res.get("n-samples", {})
    for name in names:
        raw = results.get(name)
        if raw is None:
            raise BirdboneError(f"task {name!r}: lm-eval returned no result")
        row: dict[str, Any] = {}
        for key, val in raw.items():
            if "," not in key or not isinstance(val, (int, float)):
                continue
            metric = key.split(",")[0]
            row[metric] = float(val)
        ns = n_samples.get(name, {})
        row["n"] = int(ns.get("effective", ns.get("original", 0))) if ns else None
        row["chance"] = CHANCE.get(name)
        row["primary"] = primary_metric(name)
        out[name] = row
    return out


def accuracy_report(adapter: ScoringLM, evaluation, online: bool = False) -> dict:
    """Everything a recipe's `evaluation` asks about accuracy, for one model state:
    {"tasks": run_tasks(...), "accuracy": {task: primary value}, "canaries": [...], "failed_canaries": [...]}."""
    from birdbone_core.eval.canaries import check_canaries, failed

    tasks = run_tasks(adapter, list(evaluation.tasks), evaluation.task_limit, online) if evaluation.tasks else {}
    canaries = check_canaries(adapter, list(evaluation.canaries))
    return {"tasks": tasks, "accuracy": {t: r[r["primary"]] for t, r in tasks.items()},
            "canaries": [c.as_dict() for c in canaries], "failed_canaries": failed(canaries)}


def accuracy_for(model, tokenizer, evaluation, online: bool = False) -> dict | None:
    """accuracy_report of a torch model, or None when the recipe asks for no tasks and no canaries
    (the hook the evaluate steps call)."""
    if not evaluation.tasks and not evaluation.canaries:
        return None
    return accuracy_report(TorchLM(model=model, tokenizer=tokenizer), evaluation, online)


def compare(base: dict, other: dict) -> list[dict]:
    """Per-task base vs other on the primary metric, with lm-eval's stderr. The delta's stderr treats
    the two runs as independent (sqrt(a^2 + b^2)): conservative, since both score the same documents."""
    rows = []
    for task, b in base["tasks"].items():
        o = other["tasks"].get(task)
        if o is None:
            continue
        m = b["primary"]
        sb, so = b.get(f"{m}_stderr", 0.0), o.get(f"{m}_stderr", 0.0)
        rows.append({"task": task, "metric": m, "n": b.get("n"), "chance": b.get("chance"),
                     "base": b[m], "base_stderr": sb, "value": o[m], "stderr": so,
                     "delta": o[m] - b[m], "delta_stderr": (sb ** 2 + so ** 2) ** 0.5,
                     "relative": (o[m] / b[m] - 1.0) if b[m] else None})
    return rows
