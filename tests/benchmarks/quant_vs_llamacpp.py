"""birdbone's quantizer (grid-aware GPTQ + bit budget) vs llama.cpp's llama-quantize with an imatrix, at
equal or smaller file size, scored by llama.cpp's own `llama-perplexity --kl-divergence` against the
model's F32/F16 base.

    nice -n 10 python tests/benchmarks/quant_vs_llamacpp.py --model tests/fixtures/tiny-llama \
        --points Q4_K_M,Q3_K_M --n-ctx 256 --eval-chunks 120 --calib 64x256
    flock /tmp/birdbone-heavy.lock nice -n 10 python tests/benchmarks/quant_vs_llamacpp.py \
        --model ~/.cache/birdbone/gemma-3-270m-q4_k_m.gguf --phase ... (see --help)

For each point (a llama-quantize variant of reference.VARIANTS, always with llama-imatrix from the same
calibration text): llama.cpp's file size S and mean KLD; then birdbone with all its block types, its
tensor data budget set so that its file is at most S bytes (checked), and the same KLD measurement.
Both start from the same weights (for a GGUF model: its dequantization, the F16 base). Writes
tests/benchmarks/results/quant_vs_llamacpp-<model>.{json,md}. Gemma runs can be split in phases
(`--phase llama`, `--phase birdbone`) with `--work DIR` kept between them, so each locked job is short.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference as ref  # noqa: E402
from run_reference import REPO, machine, make_base  # noqa: E402

# the Gemma points that reference.VARIANTS lacks; the IQ4_NL ones are llama.cpp's strongest stock
# files at those sizes (a non-linear 4-bit grid where q4_0 is linear)
EXTRA_VARIANTS = {"Q3_K_M-emb_q4_0": ("Q3_K_M", ("--token-embedding-type", "q4_0")),
                  "Q2_K-emb_q4_0": ("Q2_K", ("--token-embedding-type", "q4_0")),
                  "Q4_K_M-emb_iq4_nl": ("Q4_K_M", ("--token-embedding-type", "iq4_nl")),
                  "Q3_K_M-emb_iq4_nl": ("Q3_K_M", ("--token-embedding-type", "iq4_nl")),
                  "IQ4_NL-pure": ("IQ4_NL", ("--pure",))}


def _quantize_point(base, out, v, imx, threads):
    if v in EXTRA_VARIANTS:
        qtype, extra = EXTRA_VARIANTS[v]
        return ref.llama_quantize(base, out, qtype, imx, extra, threads=threads)
    return ref.quantize_variant(base, out, v, imx, threads=threads)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def llama_phase(a, work: Path, state: dict) -> None:
    from birdbone_core.data.text import read_text

    for role in ("calib", "eval"):
        text, desc = read_text(None, role)
        (work / f"{role}.txt").write_text(text, encoding="utf-8")
        state.setdefault("texts", {})[role] = desc
    base, base_src = make_base(a.model, work, a.model_shown)
    state["base"] = {"path": str(base), "source": base_src,
                     "stats": {k: v for k, v in ref.gguf_stats(base).items() if k != "tensor_types"}}
    logits = ref.kld_base(base, work / "eval.txt", a.n_ctx, out=work / f"base-c{a.n_ctx}.kld",
                          chunks=a.eval_chunks, threads=a.threads)
    state["kld_base"] = ref.kld_base_info(logits)
    state["logits"] = str(logits)
    imx = ref.llama_imatrix(base, work / "calib.txt", work / "imatrix.gguf", n_ctx=a.imatrix_ctx,
                            chunks=a.imatrix_chunks, threads=a.threads)
    state["imatrix"] = {"path": str(imx.path), "run": imx.run, "chunks": imx.chunks_processed}
    if a.model.endswith(".gguf") and "as_shipped" not in state:   # the source file itself, same protocol
        state["as_shipped"] = {"kld": ref.kld(Path(a.model), logits, threads=a.threads),
                               "stats": {k: v for k, v in ref.gguf_stats(Path(a.model)).items() if k != "tensor_types"}}
    state.setdefault("llama", {})
    for v in a.points:
        if v in state["llama"]:
            continue  # done by an earlier (interrupted) run
        out = work / f"llama-{v}.gguf"
        q = _quantize_point(base, out, v, imx.path, a.threads)
        k = ref.kld(out, logits, threads=a.threads)
        state["llama"][v] = {"quantize": q.record(), "stats": q.record()["stats"], "kld": k,
                             "tensor_types": q.stats["tensor_types"]}
        print(f"llama.cpp {v:>16}: {q.stats['file_bytes']:,} B  bpw {q.stats['bpw']:.3f}  KLD {k['mean_kld']:.5f}",
              flush=True)
        out.unlink()


def birdbone_phase(a, work: Path, state: dict) -> None:
    import torch

    from birdbone_core.data.text import calibration_blocks, read_text
    from birdbone_core.export import export_gguf
    from birdbone_core.model.load import load_model
    from birdbone_core.quant.calibration import collect_sensitivity
    from birdbone_core.quant.config import GPTQConfig, Quantize
    from birdbone_core.quant.engine import choose, measure_candidates
    from birdbone_core.quant.trials import choose_measured

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    lm = load_model(a.model)
    t_load = time.perf_counter() - t0
    n, L = (int(x) for x in a.calib.split("x"))
    text, desc = read_text(None, "calib")
    blocks = calibration_blocks(lm.tokenizer, text, n, L, 0)
    t1 = time.perf_counter()
    sens = collect_sensitivity(lm.model, blocks, batch_size=a.batch)
    t_sens = time.perf_counter() - t1
    rss_after_sens = round(_peak_rss_mib(), 1)
    types = {"types": [t.strip() for t in a.types.split(",")]} if a.types else {}
    shortlist = None if a.shortlist == "all" else int(a.shortlist)
    src = Path(a.model) if a.model.endswith(".gguf") and not a.no_keep_source else None
    # the header (metadata, tokenizer, tensor table) costs the same whatever the types; measure it once
    probe_cfg = Quantize(target_bpw=8.5, types=["Q8_0"], gptq=GPTQConfig(enabled=False), shortlist=None)
    probe = choose(measure_candidates(lm.model, probe_cfg, None), 10**15)
    res = export_gguf(lm.model, lm.tokenizer, work / "bb-probe.gguf", out_type="f16", quantized=probe.quantized,
                      source_gguf=Path(a.model) if a.model.endswith(".gguf") else None,
                      extra_metadata={"birdbone.quant.types": json.dumps(probe.types)})
    overhead = res.n_bytes - probe.n_bytes + 4096  # + margin for a longer types string and alignment
    (work / "bb-probe.gguf").unlink()
    state["birdbone_run"] = {"load_s": round(t_load, 1), "calibration": f"{n} x {L} tokens of {desc}",
                             "sensitivity_s": round(t_sens, 1), "peak_rss_after_sensitivity_mib": rss_after_sens,
                             "measure_blocks": a.measure_blocks, "shortlist": a.shortlist,
                             "settings": Quantize(target_bpw=8.0, gptq=GPTQConfig(act_order=True), shortlist=shortlist,
                                                  **types).model_dump(mode="json")}
    print(f"birdbone: load {t_load:.0f} s, sensitivity {t_sens:.0f} s, peak RSS {_peak_rss_mib():.0f} MiB", flush=True)
    # encodings (and the survey's estimates) do not depend on the budget: shared between the points, so a
    # point's candidates_s counts only the encodings it added (the first point's is the run's full cost)
    cache: dict = {}
    held = calibration_blocks(lm.tokenizer, text, a.measure_blocks, L, 1) if a.measure_blocks else None
    for v in a.points:
        target = state["llama"][v]["stats"]["file_bytes"]
        cfg = Quantize(target_bytes=target - overhead, gptq=GPTQConfig(act_order=True), shortlist=shortlist, **types)
        before = len(cache)
        t2 = time.perf_counter()
        cands = measure_candidates(lm.model, cfg, sens, source_gguf=src, cache=cache)
        t_cand = time.perf_counter() - t2
        t3 = time.perf_counter()
        estimate_only = choose(cands, target - overhead)
        trials = []
        r = estimate_only
        if held is not None:
            r, trials = choose_measured(lm.model, cands, target - overhead, held)
        t_choose = time.perf_counter() - t3
        rec = {"target_file_bytes": target, "choose_s": round(t_choose, 1), "candidates_s": round(t_cand, 1),
               "n_candidates": sum(len(o) for o in cands.options.values()), "new_cache_entries": len(cache) - before,
               "gptq_beat_plain": sum(v for d in cands.gptq_won.values() for v in d.values()),
               "source_candidates": len(cands.from_source), "peak_rss_mib": round(_peak_rss_mib(), 1),
               "trials": [{"types": t.big_types, "estimate": t.estimate, "measured_kl": t.measured_kl,
                           "chosen": t.chosen} for t in trials]}
        # the allocation birdbone ships, and (when the measured choice differs) the estimate's own optimum
        for key, q in (("shipped", r), ("estimate_only", estimate_only)):
            # the same file only if the same bytes: a big tensor's measured encoding may differ at one type
            same = q.types == r.types and all(q.quantized[n][1] is r.quantized[n][1] for n in q.quantized)
            if key == "estimate_only" and same:
                rec["estimate_only_same"] = True
                continue
            out = work / f"bb-{v}-{key}.gguf"
            res = export_gguf(lm.model, lm.tokenizer, out, out_type="f16", quantized=q.quantized,
                              source_gguf=Path(a.model) if a.model.endswith(".gguf") else None,
                              extra_metadata={"birdbone.quant.types": json.dumps(q.types),
                                              "birdbone.quant.budget_bytes": int(q.budget_bytes)})
            assert res.n_bytes <= target, (res.n_bytes, target)
            k = ref.kld(out, state["logits"], threads=a.threads)
            st = ref.gguf_stats(out)
            fields = {"file_bytes": res.n_bytes, "bpw": st["bpw"], "kept_source": len(q.kept_source),
                      "types": st["types"], "tensor_types": st["tensor_types"], "kld": k}
            if key == "shipped":
                rec.update(fields)
            else:
                rec["estimate_only"] = fields
            out.unlink()
        state.setdefault("birdbone", {})[v] = rec
        eo = rec.get("estimate_only", {}).get("kld", {}).get("mean_kld")
        print(f"birdbone  {v:>16}: {rec['file_bytes']:,} B (<= {target:,})  bpw {rec['bpw']:.3f}  KLD "
              f"{rec['kld']['mean_kld']:.5f} (llama.cpp {state['llama'][v]['kld']['mean_kld']:.5f}"
              + (f"; estimate-only allocation {eo:.5f}" if eo is not None else "") + ")", flush=True)


def markdown(state: dict) -> str:
    kb = state["kld_base"]
    lines = [f"# birdbone quantizer vs llama.cpp: {state['model']}", "",
             f"Base: {state['base']['source']['kind']}; eval {state['texts']['eval']}, n_ctx {kb['n_ctx']}, "
             f"{kb['n_chunks']} chunks, base ppl {kb['ppl']:.4f}. llama.cpp: llama-quantize with llama-imatrix "
             f"({state['imatrix']['chunks']} chunks of the calibration text). birdbone: "
             f"{state['birdbone_run']['calibration']}, grid-aware GPTQ (act-order) + Fisher-weighted bit budget"
             + (f" + measured choice of the big tensors' types ({state['birdbone_run']['measure_blocks']} fresh "
                f"calibration windows) " if state['birdbone_run'].get('measure_blocks') else " ")
             + (f"over each tensor's shortlist (survey of sampled rows, then the sizes within {state['birdbone_run']['shortlist']} "
                "of its pick encoded in full)" if str(state['birdbone_run'].get('shortlist', 'all')) != "all"
                else "over all its block types")
             + ", file no larger than llama.cpp's. KLD by llama-perplexity --kl-divergence.", "",
             "| point | llama.cpp bytes | llama.cpp bpw | llama.cpp KLD | birdbone bytes | birdbone bpw | birdbone KLD "
             "| ratio | estimate-only KLD | llama ppl | birdbone ppl | birdbone types | kept source blocks |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    trial_lines = []
    for v, b in state.get("birdbone", {}).items():
        l = state["llama"][v]
        kl, kb_ = l["kld"]["mean_kld"], b["kld"]["mean_kld"]
        types = " ".join(f"{t}×{c}" for t, c in sorted(b["types"].items(), key=lambda x: -x[1]))
        eo = ("same" if b.get("estimate_only_same") else
              f"{b['estimate_only']['kld']['mean_kld']:.5f}" if "kld" in b.get("estimate_only", {}) else "-")
        lines.append(f"| {v} | {l['stats']['file_bytes']:,} | {l['stats']['bpw']:.3f} | {kl:.5f} | "
                     f"{b['file_bytes']:,} | {b['bpw']:.3f} | {kb_:.5f} | {kb_ / kl:.2f} | {eo} | {l['kld']['ppl']:.4f} | "
                     f"{b['kld']['ppl']:.4f} | {types} | {b.get('kept_source', '-')} |")
        if b.get("trials"):
            trial_lines.append(f"- {v}: " + "; ".join(
                ("**" if t["chosen"] else "") + ", ".join(f"{n.split('.')[0]} {ty}" for n, ty in t["types"].items())
                + f" {t['measured_kl']:.4f}" + ("**" if t["chosen"] else "") for t in b["trials"]))
    if trial_lines:
        lines += ["", "Measured choice (`quantize.measure_blocks`): for each type of the big tensors the rest is "
                  "allocated by the estimate, and each allocation's mean KL on fresh calibration windows is measured "
                  "in torch; the lowest (bold) ships. estimate-only KLD: the estimate's own optimum, scored by "
                  "llama.cpp like the rest (\"same\" when the measured choice kept its bytes, \"-\" not scored).", ""] + trial_lines
    br = state["birdbone_run"]
    if "as_shipped" in state:
        s_ = state["as_shipped"]
        lines += ["", f"The model's own file as shipped ({s_['stats']['bpw']:.3f} bpw), scored the same way: KLD "
                  f"{s_['kld']['mean_kld']:.5f}, ppl {s_['kld']['ppl']:.4f}. Its weights are exactly the base's "
                  "(before F16 rounding), so this KLD is llama.cpp's own floor for that mix of types (its quantized "
                  "matmuls round activations too); no file of those types can score much below it."]
    points = state.get("birdbone", {})
    n_src = max((b.get("source_candidates", 0) for b in points.values()), default=0)
    if n_src:
        lines += ["", f"kept source blocks: tensors written with the source GGUF's own blocks (weights unchanged and "
                  f"the budget chose the source's type: exact, no re-rounding); {n_src} tensors "
                  "qualified. llama.cpp re-quantizes the F16 base and cannot know the original grid."]
    lines += ["", f"birdbone time: load {br['load_s']} s, calibration pass (forward+backward) {br['sensitivity_s']} s; "
              "per point, candidates (survey and encodings; encodings are shared between points, so a later point "
              "pays only for the ones it adds) + choosing with measured trials: "
              + ", ".join(f"{v} {b.get('candidates_s', '-')} + {b.get('choose_s', '-')} s ({b.get('n_candidates', '-')} "
                          f"candidates)" for v, b in points.items())
              + f"; peak RSS {max((b.get('peak_rss_mib', 0) for b in points.values()), default=0)} MiB. llama-quantize: "
              + ", ".join(f"{v} {l['quantize']['run']['wall_s']} s / {l['quantize']['run']['peak_rss_mib']} MiB"
                          for v, l in state["llama"].items()) + ".", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(REPO / "tests/fixtures/tiny-llama"))
    ap.add_argument("--points", default="Q4_K_M,Q3_K_M")
    ap.add_argument("--n-ctx", type=int, default=256)
    ap.add_argument("--eval-chunks", type=int, default=120)
    ap.add_argument("--imatrix-ctx", type=int, default=256)
    ap.add_argument("--imatrix-chunks", type=int, default=64)
    ap.add_argument("--calib", default="64x256", help="birdbone calibration: N_SAMPLESxSEQ_LEN")
    ap.add_argument("--batch", type=int, default=2, help="calibration blocks per forward+backward (memory: "
                    "Gemma's 262k-vocabulary logits and their gradients are ~2 GB per 8 x 256 tokens, per copy)")
    ap.add_argument("--measure-blocks", type=int, default=4,
                    help="fresh calibration windows (seed 1) on which the big tensors' type choices are scored "
                         "by measured KL (quantize.measure_blocks); 0: the estimate's allocation only")
    ap.add_argument("--types", default=None, help="birdbone candidate types (default: all ten)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shortlist", default="1", help="quantize.shortlist: sizes either side of the survey's pick "
                    "encoded in full; 'all': every type (the exhaustive search)")
    ap.add_argument("--no-keep-source", action="store_true",
                    help="re-encode every tensor (no exact candidates from the source GGUF's own blocks)")
    ap.add_argument("--phase", choices=["all", "llama", "birdbone"], default="all")
    ap.add_argument("--work", default=None)
    ap.add_argument("--tag", default=None)
    ap.add_argument("--out", default=str(REPO / "tests/benchmarks/results"))
    a = ap.parse_args()
    a.points = [p.strip() for p in a.points.split(",")]
    a.model = os.path.expanduser(a.model)
    p = Path(a.model).resolve()
    a.model_shown = os.path.relpath(p, REPO) if p.is_relative_to(REPO) else p.name
    name = a.tag or (p.stem if p.suffix == ".gguf" else p.name)
    work = Path(a.work or f"/tmp/birdbone-quant-bench-{name}")
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    state.update({"model": a.model_shown, "points": a.points, "machine": machine()})
    if a.phase in ("all", "llama"):
        llama_phase(a, work, state)
        state_path.write_text(json.dumps(state, indent=2))
    if a.phase in ("all", "birdbone"):
        birdbone_phase(a, work, state)
        state["when"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        state_path.write_text(json.dumps(state, indent=2))
        out = Path(a.out)
        text = json.dumps(state, indent=2).replace(str(work), "$WORK").replace(str(Path.home()), "~") + "\n"
        (out / f"quant_vs_llamacpp-{name}.json").write_text(text)
        md = markdown(state)
        (out / f"quant_vs_llamacpp-{name}.md").write_text(md)
        print(md)


if __name__ == "__main__":
    main()
