"""After a 50% Wanda prune: regrowth (DSnoT, RigL), healing by trainable set (weights, LoRA, QLoRA) and
OWL's outlier-aware layer allocation, each against the plain prune, on held-out text.

    flock /tmp/birdbone-heavy.lock nice -n 10 python tests/benchmarks/regrowth_healing.py [MODEL] [regrow lora owl]
    python tests/benchmarks/regrowth_healing.py --table results/regrowth_healing-gemma-3-270m.jsonl

Every result is one JSON line on stdout and in results/regrowth_healing-<model>.jsonl; the Markdown table
beside it is made from those lines. One thread (the numbers repeat run to run). Not in the default test run.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
LABELS = {"dense": "dense", "wanda50": "Wanda 50%",
          "wanda50+regrow-dsnot": "+ DSnoT regrowth (5% of pruned)",
          "wanda50+regrow-rigl": "+ RigL regrowth (5% of pruned)",
          "wanda50+blockwise-weights-10steps": "+ block-wise healing, surviving weights, 10 steps",
          "wanda50+blockwise-lora-10steps": "+ block-wise healing, LoRA, 10 steps",
          "wanda50+blockwise-qlora-10steps": "+ block-wise healing, QLoRA (4-bit base), 10 steps",
          "wanda50-owl": "Wanda 50%, OWL layer allocation"}


def table(rows: list[dict], title: str) -> str:
    dense = next(r for r in rows if r["step"] == "dense")
    plain = next((r for r in rows if r["step"] == "wanda50"), None)
    md = [f"# {title}", "", f"Dense ppl {dense['ppl']:.3f}. Calibration 16 x 128 tokens, evaluation 4 x 256 tokens "
          "of the built-in held-out slice; one torch thread.", "",
          "| run | ppl | KLD vs dense | vs Wanda 50% ppl | seconds | notes |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["step"] == "dense":
            continue
        rel = f"{r['ppl'] / plain['ppl'] - 1:+.1%}" if plain and r is not plain else "-"
        notes = []
        if "swapped" in r:
            notes.append(f"{r['swapped']:,} swaps, {r['reverted']} modules reverted")
        if "layer_sparsity" in r:
            notes.append("layer sparsity " + " ".join(f"{v:.2f}" for v in r["layer_sparsity"]))
        md.append(f"| {LABELS.get(r['step'], r['step'])} | {r['ppl']:.3f} | {r['kld']:.4f} | {rel} | {r['s']:.0f} | "
                  f"{'; '.join(notes)} |")
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=str(Path.home() / ".cache/birdbone/gemma-3-270m-q4_k_m.gguf"))
    ap.add_argument("what", nargs="*", default=["regrow", "lora", "owl"], help="any of: regrow lora owl")
    ap.add_argument("--table", help="only rebuild the Markdown table from a .jsonl of this script")
    a = ap.parse_args()
    if set(a.what) - {"regrow", "lora", "owl"}:
        ap.error(f"unknown part(s) {sorted(set(a.what) - {'regrow', 'lora', 'owl'})}; choose from regrow lora owl")
    if a.table:
        p = Path(a.table)
        rows = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
        p.with_suffix(".md").write_text(table(rows, f"Regrowth, healing and OWL after Wanda 50%: {p.stem.removeprefix('regrowth_healing-')}"))
        return

    import torch

    from birdbone_core.data.text import calibration_blocks, evaluation_chunks, read_text
    from birdbone_core.eval.perplexity import evaluate
    from birdbone_core.heal import Heal, heal
    from birdbone_core.model.load import load_model
    from birdbone_core.prune.owl import allocate
    from birdbone_core.prune.regrow import Regrow, regrow_model
    from birdbone_core.prune.sequential import prune_sequential
    from birdbone_core.recipe import parse_recipe

    torch.set_num_threads(1)
    name = Path(a.model).stem.replace("-q4_k_m", "")
    out = RESULTS / f"regrowth_healing-{name}.jsonl"
    rows: list[dict] = []

    def emit(**kw):
        rows.append(kw)
        print(json.dumps(kw), flush=True)

    t = time.time()
    lm = load_model(a.model)
    calib = calibration_blocks(lm.tokenizer, read_text(None, "calib")[0], n_samples=16, seq_len=128, seed=0)
    chunks = evaluation_chunks(lm.tokenizer, read_text(None, "eval")[0], n_ctx=256, max_chunks=4)
    dense = lm.model
    d, dh = evaluate(dense, chunks)
    emit(step="dense", ppl=d.ppl, load_eval_s=time.time() - t)
    wanda = parse_recipe({"prune": {"method": "wanda", "sparsity": 0.5, "batch_size": 4}}).prune
    t = time.time()
    pruned = copy.deepcopy(dense)
    prune_sequential(pruned, calib, wanda)
    e = evaluate(pruned, chunks, dh)[0]
    emit(step="wanda50", ppl=e.ppl, kld=e.kld, s=time.time() - t)
    if "regrow" in a.what:
        for m in ["dsnot", "rigl"]:
            q = copy.deepcopy(pruned)
            t = time.time()
            rep = regrow_model(q, dense, calib, Regrow(method=m, fraction=0.05, batch_size=4))
            s = time.time() - t
            e = evaluate(q, chunks, dh)[0]
            emit(step=f"wanda50+regrow-{m}", ppl=e.ppl, kld=e.kld, swapped=rep["swapped"],
                 reverted=sum(x["reverted"] for x in rep["layers"]), s=s)
    if "lora" in a.what:
        for tr in ["weights", "lora", "qlora"]:
            q = copy.deepcopy(pruned)
            t = time.time()
            heal(q, dense, calib, Heal(steps=10, lr=2e-4 if tr == "weights" else 1e-3, batch_size=4, trainable=tr))
            s = time.time() - t
            e = evaluate(q, chunks, dh)[0]
            emit(step=f"wanda50+blockwise-{tr}-10steps", ppl=e.ppl, kld=e.kld, s=s)
    if "owl" in a.what:
        q = copy.deepcopy(dense)
        t = time.time()
        cfg = allocate(parse_recipe({"prune": {"method": "wanda", "sparsity": 0.5, "batch_size": 4,
                                               "allocation": "owl"}}).prune, q, calib)
        prune_sequential(q, calib, cfg)
        s = time.time() - t
        e = evaluate(q, chunks, dh)[0]
        emit(step="wanda50-owl", ppl=e.ppl, kld=e.kld, layer_sparsity=[round(v, 3) for v in cfg.layer_sparsity.values()],
             s=s)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out.with_suffix(".md").write_text(table(rows, f"Regrowth, healing and OWL after Wanda 50%: {name}"))


if __name__ == "__main__":
    main()
