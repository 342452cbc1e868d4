"""The scale benchmark's table and plot (tests/benchmarks/scale.py): pure functions of its JSON."""
from __future__ import annotations

from pathlib import Path

GIB = 2**30
GOAL_3B_GIB = 6.0


def _job(row: dict, key: str) -> dict | None:
    j = row.get(key)
    return j if isinstance(j, dict) else None


def _cells(j: dict | None, fp32: int) -> tuple[str, str, str]:
    if j is None:
        return "-", "-", "-"
    if "skipped" in j:
        return "not run", "-", j["skipped"]
    if j.get("exit", 0) != 0 or j.get("ok") is False:     # the peak up to the failure is still a measurement
        peak = j.get("peak_rss_bytes")
        return (f"failed after {j.get('seconds', 0):.0f} s", f"{peak / GIB:.2f} ({peak / fp32:.0%}) until then"
                if peak else "-", j.get("last_line", ""))
    peak = j["peak_rss_bytes"]
    return f"{j['seconds']:.0f}", f"{peak / GIB:.2f} ({peak / fp32:.0%})", ""


def render_markdown(info: dict) -> str:
    lines = ["# Scale: wall time and peak RSS against model size", "",
             f"Measured {info['date']} on {info['machine']}; `python tests/benchmarks/scale.py`. Each job is its "
             "own child process, one at a time; peak RSS is that process's `ru_maxrss`. Calibration "
             f"{info['calibration']} for every job. The 1B and 3B models are random-initialized with the "
             "published shapes (`tests/benchmarks/make_models.py`), stored as bf16 safetensors." +
             (f" {info['note']}" if info.get("note") else ""), "",
             "| model | parameters | job | wall s | peak RSS GiB (of fp32 weights) | notes |",
             "|---|---|---|---|---|---|"]
    for r in info["rows"]:
        fp32 = r["fp32_bytes"]
        jobs = []
        # prune_export_in_memory: an earlier run of the same job on the whole-model path, kept for comparison
        for key in ("prune_export_in_memory", "prune_export"):
            pe = _job(r, key)
            if pe is None:
                continue
            how = (f"streamed layer by layer, {'bf16' if r['stored'] == 'bfloat16' else 'fp32'}"
                   if pe.get("streamed") else "whole model in memory, fp32")
            note = f"{how}; sparsity {pe['sparsity']:.1%}, Q8_0 GGUF {pe['gguf_bytes'] / 1e9:.2f} GB" \
                if pe.get("ok") else how
            for step in ("prune", "export"):
                wall, peak, extra = _cells(pe[step], fp32)
                jobs.append(("SparseGPT 50% prune" if step == "prune" else "GGUF Q8_0 export", wall, peak,
                             extra or note))
        for key, label in (("quantize_in_memory", "`birdbone quantize --bpw 4.5 --in-memory`"),
                           ("quantize", "`birdbone quantize --bpw 4.5`"),
                           ("llmc_gptq_w4a16", "llm-compressor GPTQ W4A16")):
            j = _job(r, key)
            if j is not None:
                wall, peak, extra = _cells(j, fp32)
                if not extra and "gguf_bytes" in j:
                    how = ("streamed layer by layer, fp32; " if j.get("streamed") else
                           "whole model in memory, fp32; " if "streamed" in j else "")
                    extra = f"{how}GGUF {j['gguf_bytes'] / 1e6:.0f} MB"
                    twin = _job(r, "quantize_in_memory") if key == "quantize" else None
                    if twin is not None and twin.get("gguf_sha256") and j.get("gguf_sha256"):
                        extra += (", the same bytes as in memory" if twin["gguf_sha256"] == j["gguf_sha256"]
                                  else ", bytes differ from the in-memory file")
                jobs.append((label, wall, peak, extra))
        for job, wall, peak, note in jobs:
            lines.append(f"| {r['model']} | {r['parameters'] / 1e9:.2f}B | {job} | {wall} | {peak} | {note} |")
    lines += ["", "## Goals", ""]
    three = [r for r in info["rows"] if "3b" in r["model"] and _job(r, "prune_export")]
    for r in three:
        pe = r["prune_export"]
        if pe.get("ok"):
            peak = pe["peak_rss_bytes"] / GIB
            lines.append(f"- {r['model']} prune + export peak RSS {peak:.2f} GiB against the goal of "
                         f"{GOAL_3B_GIB:g} GiB: {'met' if peak < GOAL_3B_GIB else 'not met'} "
                         f"(its fp32 weights are {r['fp32_bytes'] / GIB:.1f} GiB).")
    for name in ("gemma-3-270m", "llama-3.2-1b"):
        one = next((r for r in info["rows"] if r["model"] == name), None)
        q, ref = (_job(one, "quantize"), _job(one, "llmc_gptq_w4a16")) if one is not None else (None, None)
        if q is None or ref is None:
            continue
        if "skipped" in q:
            lines.append(f"- {name}: `birdbone quantize` no slower than llm-compressor's GPTQ W4A16: "
                         f"**not met**, it cannot run here ({q['skipped']}).")
        elif "skipped" not in ref:
            lines.append(f"- {name}: `birdbone quantize` {q['seconds']:.0f} s vs llm-compressor GPTQ W4A16 "
                         f"{ref['seconds']:.0f} s ({q['seconds'] / ref['seconds']:.1f}x): "
                         f"{'met' if q['seconds'] <= ref['seconds'] else 'not met'}.")
        if name == "gemma-3-270m" and "skipped" not in q:
            peak = q["peak_rss_bytes"] / GIB
            lines.append(f"- {name}: `birdbone quantize` peak RSS {peak:.2f} GiB against the goal of 2 GiB: "
                         f"{'met' if peak <= 2 else 'not met'}.")
    return "\n".join(lines) + "\n"


def render_plot(info: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {"SparseGPT 50% prune (streamed when safetensors)": ("prune_export", "prune"),
              "GGUF Q8_0 export": ("prune_export", "export"),
              "birdbone quantize 4.5 bpw": ("quantize", None),
              "llm-compressor GPTQ W4A16": ("llmc_gptq_w4a16", None)}
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, (key, sub) in series.items():
        xs, ts, ms = [], [], []
        for r in info["rows"]:
            j = _job(r, key)
            j = j.get(sub) if (j is not None and sub) else j
            if j and "skipped" not in j and j.get("exit", 0) == 0 and "peak_rss_bytes" in j:
                xs.append(r["parameters"] / 1e9)
                ts.append(j["seconds"])
                ms.append(j["peak_rss_bytes"] / GIB)
        if xs:
            ax_t.plot(xs, ts, "o-", label=label)
            ax_m.plot(xs, ms, "o-", label=label)
    xs = [r["parameters"] / 1e9 for r in info["rows"]]
    ax_m.plot(xs, [r["fp32_bytes"] / GIB for r in info["rows"]], "k:", label="the model's fp32 weights")
    ax_t.set(xlabel="parameters (billions)", ylabel="wall time (s)", title="time")
    ax_m.set(xlabel="parameters (billions)", ylabel="peak RSS (GiB)", title="memory")
    ax_m.legend(fontsize=7)
    fig.suptitle(f"birdbone against model size ({info['machine'].split(';')[0]})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
