"""One-shot pruning methods side by side on one model, one calibration set, one evaluation text.

    python tests/benchmarks/prune_methods.py [MODEL] --sparsity 0.5 --pattern unstructured

MODEL defaults to the built-in Gemma 3 270M. The model is loaded once; each method prunes a fresh copy.
Prints a Markdown table and writes JSON + Markdown under tests/benchmarks/results/. Not part of the
default test run.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from birdbone_core.data.text import calibration_blocks, evaluation_chunks, read_text
from birdbone_core.eval.perplexity import evaluate
from birdbone_core.model.load import load_model
from birdbone_core.prune.sequential import count_zeros, prune_sequential
from birdbone_core.recipe import parse_recipe

p = argparse.ArgumentParser()
p.add_argument("model", nargs="?", default=None)
p.add_argument("--sparsity", type=float, default=0.5)
p.add_argument("--pattern", default="unstructured")
p.add_argument("--methods", default="magnitude,wanda,sparsegpt")
p.add_argument("--n-samples", type=int, default=32)
p.add_argument("--seq-len", type=int, default=512)
p.add_argument("--n-ctx", type=int, default=512)
p.add_argument("--max-chunks", type=int, default=16)
p.add_argument("--eval-text", default=None, help="any text file; default: built-in held-out slice")
p.add_argument("--out", default="tests/benchmarks/results")
args = p.parse_args()

t0 = time.perf_counter()
lm = load_model(args.model)
load_s = time.perf_counter() - t0
calib = calibration_blocks(lm.tokenizer, read_text(None, "calib")[0], args.n_samples, args.seq_len, 0)
eval_text, eval_desc = read_text(args.eval_text, "eval")
chunks = evaluation_chunks(lm.tokenizer, eval_text, args.n_ctx, args.max_chunks)
dense, ref_hidden = evaluate(lm.model, chunks, description="dense")
rows = [{"method": "dense", "sparsity": 0.0, "ppl": dense.ppl, "kld": 0.0, "top1": 1.0, "prune_s": 0.0}]
print(f"dense ppl {dense.ppl:.3f}")
for method in args.methods.split(","):
    work = copy.deepcopy(lm)
    cfg = parse_recipe({"prune": {"method": method, "sparsity": args.sparsity, "pattern": args.pattern}}).prune
    rep = prune_sequential(work.model, calib, cfg, description=method)
    res, _ = evaluate(work.model, chunks, reference_hidden=ref_hidden, description=f"eval {method}")
    zeros, total = count_zeros(work.model)
    rows.append({"method": method, "sparsity": zeros / total, "ppl": res.ppl, "kld": res.kld, "top1": res.top1,
                 "prune_s": rep.seconds})
    print(f"{method}: ppl {res.ppl:.3f} kld {res.kld:.4f} top1 {res.top1:.3f} ({rep.seconds:.0f}s)", flush=True)
    del work

name = Path(lm.source.path).stem
tag = f"prune_methods-{name}-{args.pattern.replace(':', 'of')}-{int(args.sparsity * 100)}"
md = [f"# One-shot pruning, {name}, {args.sparsity:.0%} {args.pattern}", "",
      f"Calibration: built-in calib slice, {args.n_samples} x {args.seq_len} tokens, seed 0. "
      f"Evaluation: {dense.n_scored} tokens of {eval_desc}, n_ctx {args.n_ctx} (llama-perplexity protocol), "
      f"torch fp32. Machine: {platform.machine()}, {torch.get_num_threads()} threads. Model load {load_s:.0f}s.", "",
      "| method | zeros in linear layers | ppl | KLD vs dense | top-1 agree | prune time (s) |",
      "|---|---|---|---|---|---|"]
for r in rows:
    md.append(f"| {r['method']} | {r['sparsity']:.1%} | {r['ppl']:.3f} | {r['kld']:.4f} | {r['top1']:.1%} | {r['prune_s']:.0f} |")
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
(out / f"{tag}.md").write_text("\n".join(md) + "\n")
(out / f"{tag}.json").write_text(json.dumps({
    "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "args": vars(args), "rows": rows,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "torch": torch.__version__,
    "eval_text": eval_desc, "n_scored": dense.n_scored}, indent=2) + "\n")
print("\n".join(md))
