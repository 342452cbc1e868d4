"""Task accuracy of Gemma 3 270M on the shipped offline tasks (pydocs_lastword, pydocs_cloze):
base vs 50% SparseGPT (torch), and base vs a 4-bit Q4_0 GGUF (llama.cpp).

    flock /tmp/birdbone-heavy.lock nice -n 10 .venv/bin/python tests/benchmarks/task_accuracy.py \
        --sparse RUN/pruned --work /tmp/task-acc [--limit N] [--stages base_gguf,q4_0,sparse,base]

Stages (each saved to the results JSON as it finishes, so a rerun skips what is done):
  base_gguf : the built-in Gemma 3 270M GGUF (Q4_K_M mix, 7.36 bpw) in llama.cpp (LlamaCppLM adapter)
  q4_0      : that file requantized to Q4_0 (4.5 bpw) by llama.cpp's llama-quantize --allow-requantize
  sparse    : a 50% SparseGPT model directory (e.g. `make demo`'s runs/demo/pruned), torch (TorchLM)
  base      : the built-in GGUF dequantized to float, in torch (the weights SparseGPT started from)
  sparse_q8_0 : the same 50% SparseGPT model as exported by its run (--sparse-gguf), in llama.cpp
Each stage records its own --limit (first N documents of each task); deltas pair stages of equal limit.
Deltas: sparse vs base (torch), q4_0 vs base_gguf (llama.cpp), stderr sqrt(se_a^2 + se_b^2) (unpaired,
conservative). Not part of the default test run.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from birdbone_core import atomic  # noqa: E402
from birdbone_core.eval.adapters import LlamaCppLM, TorchLM  # noqa: E402
from birdbone_core.eval.tasks import OFFLINE_TASKS, paired_delta, run_tasks  # noqa: E402
from birdbone_core.model.default import default_model_path  # noqa: E402
from birdbone_core.model.load import load_model  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--sparse", required=True, help="50%% SparseGPT model directory")
p.add_argument("--work", default="/tmp/birdbone-task-acc")
p.add_argument("--sparse-gguf", help="the sparse model's exported GGUF (e.g. runs/demo/model-q8_0.gguf)")
p.add_argument("--limit", type=int, default=None)
p.add_argument("--stages", default="base_gguf,q4_0,sparse,base")
p.add_argument("--out", default="tests/benchmarks/results/task_accuracy-gemma-3-270m")
args = p.parse_args()

work = Path(args.work)
work.mkdir(parents=True, exist_ok=True)
out_json = Path(args.out + ".json")
res = json.loads(out_json.read_text()) if out_json.exists() else {"stages": {}}
res.update({"tasks": list(OFFLINE_TASKS), "base_model": str(default_model_path()), "sparse_model": args.sparse,
            "sparse_gguf": args.sparse_gguf})
old_limit = res.pop("limit", None)           # results written before limits were per stage
for st in res["stages"].values():
    st.setdefault("limit", old_limit)


def record(stage: str, what: str, scores: dict, seconds: float) -> None:
    res["stages"][stage] = {"model": what, "limit": args.limit, "seconds": round(seconds, 1), "scores": scores}
    summarise()
    print(stage, json.dumps(scores), f"{seconds:.0f}s", flush=True)


def torch_stage(stage: str, spec: str) -> None:
    t0 = time.perf_counter()
    lm = load_model(spec)
    record(stage, spec, run_tasks(TorchLM(lm), list(OFFLINE_TASKS), limit=args.limit, per_doc=True), time.perf_counter() - t0)


def gguf_stage(stage: str, path: Path) -> None:
    t0 = time.perf_counter()
    with LlamaCppLM(path, n_ctx=512) as lm:
        scores = run_tasks(lm, list(OFFLINE_TASKS), limit=args.limit, per_doc=True)
    record(stage, str(path), scores, time.perf_counter() - t0)


def delta(a: str, b: str) -> list[dict]:
    rows = []
    if a not in res["stages"] or b not in res["stages"]:
        return rows
    if res["stages"][a]["limit"] != res["stages"][b]["limit"]:
        return rows
    for task in OFFLINE_TASKS:
        sa, sb = res["stages"][a]["scores"][task], res["stages"][b]["scores"][task]
        m = sa["primary"]
        d = sb[m] - sa[m]
        se = math.hypot(sa[f"{m}_stderr"], sb[f"{m}_stderr"])
        pd, pse = paired_delta(sa["per_doc"], sb["per_doc"]) if "per_doc" in sa and "per_doc" in sb else (d, None)
        rows.append({"task": task, "metric": m, "n": sa["n"], "chance": sa["chance"], a: sa[m],
                     f"{a}_stderr": sa[f"{m}_stderr"], b: sb[m], f"{b}_stderr": sb[f"{m}_stderr"],
                     "delta": d, "delta_stderr": se, "delta_paired_stderr": pse,
                     "relative": d / sa[m] if sa[m] else None})
    return rows


def _size(path: str) -> str:
    p = Path(path)
    n = sum(f.stat().st_size for f in p.glob("*.safetensors")) if p.is_dir() else (p.stat().st_size if p.exists() else 0)
    return f"{n / 2**20:.0f}" if n else "-"


def summarise() -> None:
    """Deltas + the Markdown table from what is measured so far (after every stage)."""
    res["deltas"] = {"sparse_vs_base": delta("base", "sparse"), "q4_0_vs_base_gguf": delta("base_gguf", "q4_0"),
                     "sparse_q8_0_vs_base_gguf": delta("base_gguf", "sparse_q8_0")}
    atomic.write_json(out_json, res)
    lines = ["# Task accuracy, Gemma 3 270M (offline tasks)", "",
             "Built by `tests/benchmarks/task_accuracy.py`; stderr from lm-eval. Delta stderr: unpaired",
             "sqrt(a^2+b^2) / paired (per-document differences, same documents).", "",
             "Tasks (birdbone_core/data/tasks/README.md): pydocs_lastword = LAMBADA-style greedy last word (chance ~0,",
             "trivial 'most frequent earlier word' baseline 13.3%); pydocs_cloze = 4-way cloze (chance 25%).",
             "Models: base_gguf = the built-in Gemma 3 270M Q4_K_M GGUF in llama.cpp; q4_0 = that file",
             "requantized to Q4_0 (llama-quantize --allow-requantize); base = the same GGUF dequantized, torch;",
             "sparse = `make demo`'s 50% unstructured SparseGPT (birdbone_core/recipes/demo.yaml), torch;",
             "sparse_q8_0 = that run's exported Q8_0 GGUF, llama.cpp. Seconds are wall time at nice 10 on a",
             "shared 2-core CPU (other jobs running).", ""]
    lines += ["## Accuracy per model", "", "| stage | size MB | task | metric | n | chance | value ± stderr |",
              "|---|---|---|---|---|---|---|"]
    for stage, st in res["stages"].items():
        size = _size(st["model"])
        for task, sc in st["scores"].items():
            m = sc["primary"]
            lines.append(f"| {stage} | {size} | {task} | {m} | {sc['n']} | {sc['chance']:.0%} "
                         f"| {sc[m]:.3f} ± {sc[m + '_stderr']:.3f} |")
    lines.append("")
    for name, rows in res["deltas"].items():
        if not rows:
            continue
        a, b = name.split("_vs_")[1], name.split("_vs_")[0]
        lines += [f"## {b} vs {a} (first {res['stages'][a].get('limit')} documents of each task)", "", f"| task | metric | n | chance | {a} | {b} | delta ± unpaired / paired stderr | relative |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            rel = "-" if r["relative"] is None else f"{r['relative']:+.1%}"
            lines.append(f"| {r['task']} | {r['metric']} | {r['n']} | {r['chance']:.0%} | {r[a]:.3f} ± {r[a + '_stderr']:.3f} "
                         f"| {r[b]:.3f} ± {r[b + '_stderr']:.3f} | {r['delta']:+.3f} ± {r['delta_stderr']:.3f} / "
                         f"{'-' if r['delta_paired_stderr'] is None else format(r['delta_paired_stderr'], '.3f')} | {rel} |")
        lines.append("")
    for stage, s in res["stages"].items():
        lines.append(f"- {stage}: {s['model']} (limit {s.get('limit')}, {s['seconds']:.0f} s)")
    atomic.write_text(Path(args.out + ".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


stages = args.stages.split(",")
q4 = work / "gemma-3-270m-q4_0.gguf"
for stage in stages:
    if stage in res["stages"]:
        print(stage, "already measured")
        continue
    if stage == "base":
        torch_stage("base", str(default_model_path()))
    elif stage == "sparse":
        torch_stage("sparse", args.sparse)
    elif stage == "sparse_q8_0":
        gguf_stage("sparse_q8_0", Path(args.sparse_gguf))
    elif stage == "base_gguf":
        gguf_stage("base_gguf", default_model_path())
    elif stage == "q4_0":
        if not q4.exists():
            from llamacpp_tools import tool  # the cached llama.cpp build
            subprocess.run([str(tool("llama-quantize")), "--allow-requantize", str(default_model_path()), str(q4),
                            "Q4_0", "1"], check=True, capture_output=True)
        gguf_stage("q4_0", q4)
summarise()
