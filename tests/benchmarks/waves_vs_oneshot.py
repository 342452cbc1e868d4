"""Pruning in waves with healing vs one-shot pruning, same model, same calibration and evaluation data.

    python tests/benchmarks/waves_vs_oneshot.py [MODEL] --sparsity 0.5 --per-wave 0.1 --heal-steps 30

Runs `birdbone compress` twice (one-shot recipe, waves recipe) into a scratch directory and writes a
Markdown + JSON summary under tests/benchmarks/results/. Not part of the default test run.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

from birdbone_core.compress import compress

p = argparse.ArgumentParser()
p.add_argument("model", nargs="?", default="tests/fixtures/tiny-llama")
p.add_argument("--method", default="sparsegpt")
p.add_argument("--sparsity", type=float, default=0.5)
p.add_argument("--per-wave", type=float, default=0.1)
p.add_argument("--heal", default="blockwise")
p.add_argument("--heal-steps", type=int, default=30)
p.add_argument("--heal-lr", type=float, default=1e-3)
p.add_argument("--stop-loss", type=float, default=0.03,
               help="stop-loss threshold: relative ppl rise over the last accepted wave (the recipe default 0.03)")
p.add_argument("--regrow", choices=["none", "dsnot", "rigl"], default="none",
               help="regrowth after healing in each wave (fraction 0.05 of the pruned weights)")
p.add_argument("--n-samples", type=int, default=32)
p.add_argument("--seq-len", type=int, default=128)
p.add_argument("--n-ctx", type=int, default=128)
p.add_argument("--max-chunks", type=int, default=48)
p.add_argument("--out", default="tests/benchmarks/results")
args = p.parse_args()

base = {"calibration": {"n_samples": args.n_samples, "seq_len": args.seq_len},
        "evaluation": {"n_ctx": args.n_ctx, "max_chunks": args.max_chunks},
        "prune": {"method": args.method, "sparsity": args.sparsity}, "export": {"type": "f16"}}
recipes = {
    "one-shot": {**base, "name": "one-shot"},
    "waves+heal": {**base, "name": "waves", "waves": {
        "max_per_wave": args.per_wave, "heal": {"method": args.heal, "steps": args.heal_steps, "lr": args.heal_lr},
        "stop_loss": {"threshold": args.stop_loss, "patience": 2}}},
}
if args.regrow != "none":
    recipes["waves+heal"]["waves"]["regrow"] = {"method": args.regrow, "fraction": 0.05}
rows = {}
with tempfile.TemporaryDirectory() as tmp:
    for name, r in recipes.items():
        rp = Path(tmp) / f"{name}.yaml"
        rp.write_text(yaml.safe_dump(r))
        t0 = time.perf_counter()
        m = compress(Path(tmp) / name, args.model, str(rp))
        rep = json.loads((Path(tmp) / name / "prune_report.json").read_text())
        rows[name] = {"ppl": m["compressed"]["ppl"], "kld": m["compressed"]["kld"], "top1": m["compressed"]["top1"],
                      "sparsity": m["compressed"]["sparsity"], "base_ppl": m["base"]["ppl"],
                      "seconds": time.perf_counter() - t0, "waves": rep.get("waves")}

tag = f"waves_vs_oneshot-{Path(args.model).name}-{args.method}-{int(args.sparsity * 100)}"
if args.stop_loss != 0.03 or args.regrow != "none":
    tag += f"-stoploss{args.stop_loss:g}" + (f"-{args.regrow}" if args.regrow != "none" else "")
md = [f"# {args.method} {args.sparsity:.0%}: one shot vs {args.per_wave:.0%}-per-wave with {args.heal} healing "
      f"({args.heal_steps} steps, lr {args.heal_lr})", "",
      f"Stop-loss: roll back after 2 waves in a row each more than {args.stop_loss:.0%} above the last accepted "
      f"wave's ppl; regrowth: {args.regrow}.", "",
      f"Model {args.model}; calibration {args.n_samples} x {args.seq_len} (built-in calib slice); evaluation n_ctx "
      f"{args.n_ctx}, {args.max_chunks} chunks of the built-in held-out slice; base ppl {rows['one-shot']['base_ppl']:.3f}.", "",
      "| run | zeros | ppl | KLD vs base | top-1 | wall s |", "|---|---|---|---|---|---|"]
for n, r in rows.items():
    md.append(f"| {n} | {r['sparsity']:.1%} | {r['ppl']:.3f} | {r['kld']:.4f} | {r['top1']:.1%} | {r['seconds']:.0f} |")
md += ["", "| wave | target | ppl after pruning | ppl after healing | share of the wave's loss recovered | verdict |",
       "|---|---|---|---|---|---|"]
for w in rows["waves+heal"]["waves"] or []:
    if "verdict" in w:
        rec = w.get("healing_recovered")
        md.append(f"| {w['wave']} | {w['target']:.0%} | {w['ppl_pruned']:.3f} | {w['ppl_healed']:.3f} | "
                  f"{'-' if rec is None else f'{rec:.0%}'} | {w['verdict']['action']} |")
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
(out / f"{tag}.md").write_text("\n".join(md) + "\n")
(out / f"{tag}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
print("\n".join(md))
