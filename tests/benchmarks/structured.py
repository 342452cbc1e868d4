"""Structured compression against llama.cpp's own quants, scored the way a llama.cpp user sees a file:
size, llama-bench speed, held-out bits per byte (comparable across tokenizers), matmul FLOPs per token.

    python tests/benchmarks/structured.py [--model GGUF] [--out tests/benchmarks/results] [--threads 1]

Every GGUF in the table is quantized by stock llama-quantize with an imatrix that llama-imatrix computed
on that very model from the same calibration text, so the structured points differ from llama.cpp's only
in their structure:
- llama.cpp: the dense model (birdbone's F16 export of the source) -> Q8_0, Q4_K_M, Q4_K_M with a q4_0
  token embedding (the "169 MB point");
- birdbone: vocabulary trimmed to the tokens the calibration text needs, filled up to N by the tokenizer's
  prior (`birdbone_core.structure.tokenizers.trim_vocab`), optionally FFN neurons / layers removed
  (unhealed), then the same Q4_K_M (+ q4_0 embedding) recipe.
Speed: `llama-bench -p 128 -n 64 -r 3`, one thread unless --threads, one file after another in one run.
Bits per byte: 8 held-out segments of >= 2 KB each, each tokenized by the file's own tokenizer and scored
from BOS (`birdbone_core.eval.llamacpp.llama_bits_per_byte`). FLOPs: 2 x the weights of every matmul per
token (the embedding lookup is not one; a tied head is). The trimmed files are also checked: the
calibration text tokenizes to the same pieces under llama.cpp, and the share of held-out text that does
not is reported with examples.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

HEAL_STEPS, HEAL_LR = 40, 1e-4   # distillation from the dense model, 4 x 256 tokens a step
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))


REF_POINT = "dense Q4_K_M-emb_q4_0"      # llama.cpp's 169 MB file: the speed reference
DENSE_KEY = (None, 0, 0.0, 0, 1, 16)      # the dense model's F16 file in a run's cache


class Point(NamedTuple):
    name: str
    vocab: int | None      # vocabulary tokens kept (None: unchanged)
    layers: int            # decoder layers dropped
    ffn: float             # share of FFN neurons removed
    heal: int              # distillation steps per wave (0: unhealed)
    quant: str             # llama-quantize variant
    waves: int = 1         # structural waves (birdbone_core.structure.apply)
    samples: int = 16      # calibration windows of 256 tokens (scoring and healing)


POINTS = [
    Point("dense Q8_0", None, 0, 0.0, 0, "Q8_0"),
    Point("dense Q4_K_M", None, 0, 0.0, 0, "Q4_K_M"),
    Point("dense Q4_K_M-emb_q4_0", None, 0, 0.0, 0, "Q4_K_M-emb_q4_0"),
    Point("vocab 32k Q4_K_M", 32768, 0, 0.0, 0, "Q4_K_M"),
    Point("vocab 16k Q4_K_M", 16384, 0, 0.0, 0, "Q4_K_M"),
    Point("vocab 16k Q4_K_M-emb_q4_0", 16384, 0, 0.0, 0, "Q4_K_M-emb_q4_0"),
    Point("vocab 8k Q4_K_M", 8192, 0, 0.0, 0, "Q4_K_M"),
    Point("vocab 16k + FFN -25% Q4_K_M", 16384, 0, 0.25, 0, "Q4_K_M"),
    Point("vocab 16k + FFN -25% healed Q4_K_M", 16384, 0, 0.25, HEAL_STEPS, "Q4_K_M"),
    Point("vocab 8k + FFN -50% + 2 layers healed Q4_K_M", 8192, 2, 0.5, HEAL_STEPS, "Q4_K_M"),
    # the <= 30% FLOPs goal: the cut in 4 healed waves, 6x the healing steps on 4x the windows
    Point("vocab 16k + FFN -44% 4 waves healed Q4_K_M", 16384, 0, 0.44, 60, "Q4_K_M", waves=4, samples=64),
]


def matmul_flops_per_token(model) -> int:
    """2 x weights of every nn.Linear (the LM head included, tied or not)."""
    import torch

    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    head = model.get_output_embeddings()
    if head is not None and not any(head is m for m in model.modules() if isinstance(m, torch.nn.Linear)):
        n += head.weight.numel()
    return 2 * n


def piece_tokenizer(stack: contextlib.ExitStack, gguf: Path):
    """text -> llama.cpp's tokenization of it as token texts (ids differ between trimmed and full
    vocabularies), with the vocabulary loaded once."""
    from birdbone_core.eval.llamacpp import open_llama

    llm = stack.enter_context(open_llama(gguf, vocab_only=True))
    return lambda text: [llm._model.token_get_text(i)
                         for i in llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the built-in Gemma 3 270M")
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "benchmarks" / "results")
    ap.add_argument("--work", type=Path, default=Path("/tmp/birdbone-structured"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tasks", type=int, default=0, metavar="N",
                    help="then task accuracy (pydocs_lastword, pydocs_cloze; first N documents each) of the points "
                         "in TASK_POINTS, in llama.cpp, added to the results of the last run (--tasks-only: only that)")
    ap.add_argument("--tasks-only", action="store_true")
    ap.add_argument("--points", help="comma-separated point names to run (default: all; the dense Q8_0 and "
                                     f"{REF_POINT} references always run)")
    ap.add_argument("--merge", action="store_true", help="keep the earlier results' rows for the points not run")
    ap.add_argument("--kld-only", action="store_true",
                    help="KL divergence of the points whose vocabulary is unchanged against the dense F16 file "
                         "(llama-perplexity, 8 chunks of 512 tokens), added to the results of the last run")
    a = ap.parse_args(argv)
    name = Path(a.model or "gemma-3-270m-q4_k_m.gguf").stem
    if a.tasks_only:
        return add_task_accuracy(a.out, name, a.tasks or 100, a.threads, set(a.points.split(",")) if a.points else set())
    if a.kld_only:
        return add_kld(a.out, name, a.work, a.threads)

    import reference as ref
    import torch

    from birdbone_core.data.text import calibration_blocks, read_text
    from birdbone_core.eval.llamacpp import llama_bits_per_byte
    from birdbone_core.export.gguf_file import export_gguf
    from birdbone_core.export.vocab import read_gguf_tokenizer, write_tokenizer_gguf
    from birdbone_core.model.default import default_model_path
    from birdbone_core.model.load import load_model
    from birdbone_core.structure.apply import apply_structure
    from birdbone_core.structure.config import Structure
    from birdbone_core.structure.tokenizers import tokenization_diff

    wanted = set(a.points.split(",")) if a.points else {p.name for p in POINTS}
    unknown = wanted - {p.name for p in POINTS}
    if unknown:
        ap.error(f"unknown points {sorted(unknown)}; see POINTS")
    wanted |= {"dense Q8_0", REF_POINT}      # the task and speed references run in every run
    torch.set_num_threads(2)
    spec = a.model or str(default_model_path())
    base = load_model(spec)
    src_tok = read_gguf_tokenizer(Path(spec))
    calib, calib_desc = read_text(None, "calib")
    held, held_desc = read_text(None, "eval")
    a.work.mkdir(parents=True, exist_ok=True)
    (a.work / "calib.txt").write_text(calib)
    dense_flops = matmul_flops_per_token(base.model)
    f16_cache: dict[tuple, Path] = {}
    rows = []
    measured = time.strftime("%Y-%m-%d")
    for pt in (p for p in POINTS if p.name in wanted):
        t0 = time.perf_counter()
        key = pt[1:5] + pt[6:]
        row: dict = {"point": pt.name, "vocab": pt.vocab, "layers_dropped": pt.layers, "ffn_removed": pt.ffn,
                     "heal_steps": pt.heal, "waves": pt.waves, "calib_samples": pt.samples, "quant": pt.quant,
                     "measured": measured}
        if key not in f16_cache:
            model, tok, gtok = copy.deepcopy(base.model), base.tokenizer, src_tok
            if pt.vocab or pt.layers or pt.ffn:     # the product's path: birdbone_core.structure.apply
                cfg = Structure(vocab=pt.vocab, layers=pt.layers, ffn=pt.ffn, heal_steps=pt.heal, heal_lr=HEAL_LR,
                                waves=pt.waves)
                blocks = calibration_blocks(base.tokenizer, calib, pt.samples, 256, 0)
                cut = apply_structure(model, tok, cfg, blocks, corpus=(calib, calib_desc), source_gguf=Path(spec),
                                      held=(held, held_desc))
                tok, gtok = cut.tokenizer, cut.gguf_tokenizer
                row["structure_waves"] = [{k: v for k, v in w.items() if k not in ("vocab", "width", "layers")}
                                          for w in cut.record["waves"]]
                if "vocab" in cut.record:
                    row["vocab_trim"] = {k: v for k, v in cut.record["vocab"].items() if k != "kept_ids"}
                if "layers" in cut.record:
                    row["layers_removed"] = cut.record["layers"]["removed"]
                heals = [w["heal"] for w in cut.record["waves"] if "heal" in w]
                if heals:
                    row["heal"] = {"kl_before": heals[0]["kl_before"], "kl_after": heals[-1]["kl_after"],
                                   "seconds": round(sum(h["seconds"] for h in heals), 1)}
            tag = f"v{pt.vocab or 0}-d{pt.layers}-f{int(pt.ffn * 100)}-h{pt.heal}" + (
                f"-w{pt.waves}-s{pt.samples}" if (pt.waves, pt.samples) != (1, 16) else "")
            tok_path = write_tokenizer_gguf(gtok, a.work / f"{tag}.tokenizer.gguf")
            f16 = a.work / f"{tag}.f16.gguf"
            export_gguf(model, tok, f16, out_type="f16", source_gguf=tok_path)
            ref.llama_imatrix(f16, a.work / "calib.txt", a.work / f"{tag}.imatrix.gguf", n_ctx=512, chunks=32,
                              threads=2)
            if pt.vocab:   # llama.cpp's own tokenizer on the trimmed file: corpus identical, held-out share
                with contextlib.ExitStack() as stack:
                    before = piece_tokenizer(stack, f16_cache[DENSE_KEY])
                    after = piece_tokenizer(stack, f16)
                    row["calib_pieces_identical"] = before(calib) == after(calib)
                    row["held_out_tokenization"] = tokenization_diff(before, after, held)
            row.update(layers=model.config.num_hidden_layers, intermediate_size=model.config.intermediate_size,
                       vocab_size=model.config.vocab_size, params=sum(p.numel() for p in model.parameters()),
                       flops_per_token=matmul_flops_per_token(model))
            f16_cache[key] = f16
            f16_cache[(key, "row")] = {k: row[k] for k in row if k not in ("point", "quant")}
            del model
        else:
            row.update({k: v for k, v in f16_cache[(key, "row")].items() if k not in row})
        f16 = f16_cache[key]
        tag = f16.name.removesuffix(".f16.gguf")
        out = a.work / f"{tag}.{pt.quant}.gguf"
        ref.quantize_variant(f16, out, pt.quant, a.work / f"{tag}.imatrix.gguf", threads=2)
        row["gguf_bytes"] = out.stat().st_size
        row.update(llama_bits_per_byte(out, held, n_threads=a.threads))
        row["gguf"] = str(out)
        row["flops_vs_dense"] = row["flops_per_token"] / dense_flops
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "held_out_tokenization"}), flush=True)
    del base
    for row in rows:    # all speeds last, back to back, with nothing else running in this process
        b = ref.bench(row["gguf"], threads=a.threads, n_prompt=128, n_gen=64, reps=3)
        row.update(pp_tps=b.get("pp_tps"), tg_tps=b.get("tg_tps"))
        print(f"{row['point']}: pp {row['pp_tps']:.0f} tok/s, tg {row['tg_tps']:.1f} tok/s", flush=True)
    ref_tg = next(r["tg_tps"] for r in rows if r["point"] == REF_POINT)
    for row in rows:
        row["tg_vs_ref"] = row["tg_tps"] / ref_tg     # within this run: speeds compare only within a run
    if a.merge:     # the earlier run's rows for the points not run now
        path = a.out / f"structured-{name}.json"
        old = {r["point"]: r for r in json.loads(path.read_text())["rows"]} if path.is_file() else {}
        for r in old.values():      # an earlier run's rows keep their speed ratio to that run's reference
            if "tg_vs_ref" not in r and REF_POINT in old:
                r["tg_vs_ref"] = r["tg_tps"] / old[REF_POINT]["tg_tps"]
            r.setdefault("measured", "earlier run")
        new = {r["point"]: r for r in rows}
        rows = [new.get(p.name) or old[p.name] for p in POINTS if p.name in new or p.name in old]
    write_results(a.out, name, spec, held_desc, calib_desc, a.threads, rows)
    rerun = {r["point"] for r in rows if r.get("measured") == measured}
    return add_task_accuracy(a.out, name, a.tasks, a.threads, rerun) if a.tasks else 0


def add_kld(out: Path, name: str, work: Path, threads: int) -> int:
    """KLD vs the dense F16 export (llama-perplexity --kl-divergence) of every point with the full vocabulary
    (a trimmed vocabulary has other token ids: there it is undefined, and bits per byte compares)."""
    import reference as ref

    from birdbone_core.data.text import read_text

    path = out / f"structured-{name}.json"
    data = json.loads(path.read_text())
    held, _ = read_text(None, "eval")
    (work / "held.txt").write_text(held)
    base = ref.kld_base(work / "v0-d0-f0-h0.f16.gguf", work / "held.txt", 512, chunks=8, threads=2)
    for r in data["rows"]:
        if r["vocab"] is None and Path(r["gguf"]).is_file():     # an earlier run's row keeps its figure
            k = ref.kld(r["gguf"], base, threads=2)
            r["kld"] = {key: k.get(key) for key in ("mean_kld", "median_kld", "kld_99", "same_top_p", "n_chunks")}
            print(r["point"], r["kld"], flush=True)
    path.write_text(json.dumps(data, indent=1))
    md = (out / f"structured-{name}.md").read_text().rstrip("\n").split("\n")
    md = [ln for ln in md if not ln.startswith("KL divergence vs the dense F16 file")]
    at = md.index("## Task accuracy") - 1 if "## Task accuracy" in md else len(md)
    md[at:at] = ["", "KL divergence vs the dense F16 file where the vocabulary is unchanged (llama-perplexity "
                 "--kl-divergence, 8 chunks of 512 held-out tokens; `--kld-only`): " + "; ".join(
                     f"{r['point']}: mean {r['kld']['mean_kld']:.5f}, 99th pct {r['kld']['kld_99']:.4f}, "
                     f"same top token {r['kld']['same_top_p']:.1%}" for r in data["rows"] if r.get("kld"))]
    (out / f"structured-{name}.md").write_text("\n".join(md) + "\n")
    return 0


TASK_POINTS = ("dense Q8_0", "dense Q4_K_M-emb_q4_0", "vocab 16k Q4_K_M", "vocab 16k + FFN -25% Q4_K_M",
               "vocab 16k + FFN -25% healed Q4_K_M", "vocab 8k + FFN -50% + 2 layers healed Q4_K_M",
               "vocab 16k + FFN -44% 4 waves healed Q4_K_M")


def add_task_accuracy(out: Path, name: str, limit: int, threads: int, rerun: set[str]) -> int:
    """Task accuracy of TASK_POINTS' GGUFs (kept in --work by the run) in llama.cpp, each with its own
    tokenizer, for the points in `rerun` and those not scored yet; deltas against the dense Q8_0 file (the
    same file in every run: llama-quantize's Q8_0 ignores the imatrix), paired per document."""
    from birdbone_core.eval.adapters import LlamaCppLM
    from birdbone_core.eval.tasks import paired_delta, run_tasks

    path = out / f"structured-{name}.json"
    data = json.loads(path.read_text())
    rows = {r["point"]: r for r in data["rows"]}
    for point in TASK_POINTS:
        r = rows.get(point)
        if r is None or ("tasks" in r and point not in rerun) or not Path(r["gguf"]).is_file():
            continue      # an earlier run's row keeps its scores
        t0 = time.perf_counter()
        with LlamaCppLM(r["gguf"], n_threads=max(threads, 2)) as lm:
            r["tasks"] = run_tasks(lm, ["pydocs_lastword", "pydocs_cloze"], limit=limit, per_doc=True)
        r["tasks_seconds"] = round(time.perf_counter() - t0, 1)
        print(point, {t: round(v[v["primary"]], 3) for t, v in r["tasks"].items()}, flush=True)
    dense = rows["dense Q8_0"]["tasks"]
    scored = [p for p in TASK_POINTS if "tasks" in rows.get(p, {})]
    for point in scored:
        for task, res in rows[point]["tasks"].items():
            d, se = paired_delta(dense[task]["per_doc"], res["per_doc"])
            res["delta_vs_dense"], res["delta_stderr"] = d, se
    data["tasks_limit"] = limit
    path.write_text(json.dumps(data, indent=1))
    lines = (out / f"structured-{name}.md").read_text().split("\n## Task accuracy")[0].rstrip("\n").split("\n")
    lines += ["", "## Task accuracy", "",
              f"First {limit} documents of each shipped task (birdbone_core/data/tasks), each GGUF in llama.cpp with "
              "its own tokenizer; delta vs dense Q8_0 paired per document (± its stderr). "
              "`python tests/benchmarks/structured.py --tasks-only --tasks N` after a run.", "",
              "| point | FLOPs/token vs dense | pydocs_lastword | Δ | pydocs_cloze | Δ |", "|---|---|---|---|---|---|"]
    for point in scored:
        r = rows[point]
        cells = []
        for task in ("pydocs_lastword", "pydocs_cloze"):
            res = r["tasks"][task]
            cells += [f"{res[res['primary']]:.3f}", f"{res['delta_vs_dense'] * 100:+.1f} ± {res['delta_stderr'] * 100:.1f} pts"]
        lines.append(f"| {point} | {r['flops_vs_dense']:.2f} | " + " | ".join(cells) + " |")
    (out / f"structured-{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-len(scored) - 2:]))
    return 0


def write_results(out: Path, name: str, spec: str, held_desc: str, calib_desc: str, threads: int, rows: list) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"structured-{name}.json").write_text(json.dumps({"model": spec, "eval": held_desc, "calibration": calib_desc,
                                                             "threads": threads, "rows": rows}, indent=1))
    lines = [f"# Structured compression vs llama.cpp's quants: {name}", "",
             f"Every file quantized by stock llama-quantize with an imatrix of that model ({calib_desc}); bits per "
             f"byte on {held_desc} (8 segments of >= 2 KB, each file's own tokenizer); llama-bench -p 128 -n 64 "
             f"-r 3, {threads} thread(s), every file of one run back to back (the run column: speeds compare within "
             f"a run; each run has its own {REF_POINT} row). `python tests/benchmarks/structured.py "
             f"[--points A,B --merge]`. 'healed': distillation from the uncut model's top-64 logits (4 x 256 "
             f"tokens a step, lr {HEAL_LR}) on the calibration windows, {HEAL_STEPS} steps unless the point says "
             f"otherwise; 'N waves': the cut in N even waves (`structure.waves`), each healed; the others are "
             f"unhealed.", "",
             "| point | vocab | layers | FFN | heal steps x waves (windows) | GGUF MB | FLOPs/token vs dense | pp tok/s "
             "| tg tok/s | tg vs Q4_K_M-emb_q4_0 | bits/byte | run |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        heal = f"{r['heal_steps']} x {r.get('waves', 1)} ({r.get('calib_samples', 16)})" if r["heal_steps"] else "-"
        vs = r["tg_vs_ref"]
        lines.append(f"| {r['point']} | {r['vocab_size']} | {r['layers']} | {r['intermediate_size']} | {heal} | "
                     f"{r['gguf_bytes'] / 1e6:.1f} | {r['flops_vs_dense']:.2f} | {r['pp_tps']:.0f} | {r['tg_tps']:.1f} | "
                     f"{vs:.2f}x | {r['bits_per_byte']:.4f} | {r['measured']} |")
    lines += ["", "Healing (top-64 KL to the uncut model, before -> after): " + "; ".join(
        f"{r['point']}: {r['heal']['kl_before']:.3f} -> {r['heal']['kl_after']:.3f} ({r['heal']['seconds']:.0f} s)"
        for r in rows if r.get("heal")), "",
              "Tokenization of the trimmed files (llama.cpp's tokenizer; a paragraph counts whole when any of its "
              "pieces differ; the 8k vocabulary is smaller than the 8,421 tokens the calibration text needs, so "
              "that text cannot tokenize identically there):", ""]
    for r in rows:
        if r.get("held_out_tokenization") and r["quant"] == "Q4_K_M":
            h = r["held_out_tokenization"]
            lines.append(f"- {r['point']}: calibration text tokenizes identically: {r['calib_pieces_identical']}; "
                         f"held-out paragraphs tokenizing differently: {h['share_differing']:.1%} of bytes; e.g. "
                         f"{h['examples'][0]['before']} -> {h['examples'][0]['after']}" if h["examples"] else "")
    waved = [r for r in rows if len(r.get("structure_waves", [])) > 1]
    if waved:
        lines += ["", "Waves (torch, before quantization: held-out bits per byte after each wave, and its healing's "
                  "top-64 KL to the uncut model):", ""]
        lines += [f"- {r['point']}: " + "; ".join(
            f"wave {w['wave']}: {w['bits_per_byte']:.4f} bits/byte, KL {w['heal']['kl_before']:.3f} -> "
            f"{w['heal']['kl_after']:.3f}" for w in r["structure_waves"]) for r in waved]
    klds = [r for r in rows if r.get("kld")]
    if klds:
        lines += ["", "KL divergence vs the dense F16 file where the vocabulary is unchanged (llama-perplexity "
                  "--kl-divergence, 8 chunks of 512 held-out tokens; `--kld-only`): " + "; ".join(
                      f"{r['point']}: mean {r['kld']['mean_kld']:.5f}, 99th pct {r['kld']['kld_99']:.4f}, "
                      f"same top token {r['kld']['same_top_p']:.1%}" for r in klds)]
    (out / f"structured-{name}.md").write_text("\n".join(lines) + "\n")
    plot(out / f"structured-{name}.png", rows, name)
    print("\n".join(lines))


def plot(path: Path, rows: list, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (x, xlabel) in zip(axes, (("tg_tps", "decode tok/s (llama-bench tg64)"), ("gguf_bytes", "GGUF MB"))):
        for r in rows:
            xv = r[x] / (1e6 if x == "gguf_bytes" else 1)
            dense = r["vocab"] is None
            ax.scatter(xv, r["bits_per_byte"], marker="s" if dense else "o", color="tab:gray" if dense else "tab:blue")
            ax.annotate(r["point"], (xv, r["bits_per_byte"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out bits per byte (lower is better)")
        ax.grid(alpha=0.3)
    axes[0].set_title("speed vs quality (right and down is better)")
    axes[1].set_title("size vs quality (left and down is better)")
    fig.suptitle(f"{name}: llama.cpp quants (squares) and birdbone structured points (circles)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
