"""Wall time and peak memory against model size: does model size stop being a question?

    python tests/benchmarks/scale.py [--models gemma-3-270m,llama-3.2-1b,llama-3.2-3b] [--work DIR]

For each model, each job runs as its own child process (peak RSS = that child's ru_maxrss, wall time
around it), one after another on this machine:

- prune + export: `birdbone init` with a one-shot SparseGPT 50% recipe (calibration 16 x 256 tokens, Q8_0
  export), then `birdbone prune RUN` and `birdbone export RUN`, both streamed layer by layer
  (birdbone_core.model.stream): a safetensors source in its stored dtype (bf16 for the generated models),
  a GGUF source (Gemma) dequantized tensor by tensor to fp32.
- `birdbone quantize SRC --bpw 4.5` (same calibration), streamed layer by layer (birdbone_core.quant.stream)
  in fp32; `--quantize-in-memory` runs the whole-model path instead (a `quantize_in_memory` job beside it).
- llm-compressor's GPTQ W4A16 one-shot (its own venv, `make -C tests/benchmarks/llmc`) on Gemma and the 1B
  model, when that venv exists, with the very same calibration tokens (Gemma: from a safetensors copy of the
  dequantized GGUF, made once and not timed, since llm-compressor loads Hugging Face directories).

The generated models are random-initialized with published shapes (tests/benchmarks/make_models.py; nothing
is downloaded), built into WORK once. Results: tests/benchmarks/results/scale.{json,md,png}.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "tests" / "benchmarks" / "results"
LLMC_PY = ROOT / ".venv-llmc" / "bin" / "python"
GIB = 2**30
N_SAMPLES, SEQ_LEN = 16, 256


def child(args: list[str], log: Path) -> dict:
    """Run a command; its wall time, peak RSS (bytes: that very process's, clitools.run_measured) and exit code."""
    from clitools import run_measured

    env = {**os.environ, "BIRDBONE_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    code, peak, wall = run_measured(args, log, env)
    tail = log.read_text().strip().splitlines()[-1:] if log.is_file() else []
    print(f"  {' '.join(map(str, args[2:5]))}...: {wall:.0f} s, peak {peak / 2**30:.2f} GiB, "
          f"exit {code} {tail}", flush=True)
    return {"seconds": round(wall, 1), "peak_rss_bytes": peak, "exit": code, "log": str(log),
            "last_line": tail[0] if tail else ""}


def birdbone(*args) -> list[str]:
    return [sys.executable, "-m", "birdbone_core.cli", *map(str, args)]


def _make_models():
    spec = importlib.util.spec_from_file_location("make_models", ROOT / "tests" / "benchmarks" / "make_models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def source_for(name: str, work: Path) -> tuple[Path, int, str]:
    """(model path, parameter count, stored dtype) of a benchmark model, generating it when needed."""
    if name == "gemma-3-270m":
        from birdbone_core.model.default import default_model_path
        from birdbone_core.model.gguf_header import read_gguf_header

        path = default_model_path()
        n = 0
        for t in read_gguf_header(path).tensors:
            k = 1
            for s in t.shape:
                k *= s
            n += k
        return path, n, "gguf (Q8_0/Q5_0/Q4_K/Q6_K)"
    out = work / name
    mm = _make_models()
    if not (out / "config.json").is_file():
        mm.make(name, out, verify=False)
    n = mm.make(name, None, dry_run=True)["parameters"]
    return out, n, "bfloat16"


def recipe_file(work: Path, name: str, streamed: bool) -> Path:
    recipe = {"name": f"scale-{name}", "calibration": {"n_samples": N_SAMPLES, "seq_len": SEQ_LEN},
              "prune": {"method": "sparsegpt", "sparsity": 0.5}, "export": {"type": "q8_0"}}
    if streamed:
        recipe["runtime"] = {"dtype": "bfloat16"}     # the checkpoint's own dtype (cpu auto would be fp32)
    path = work / f"recipe-{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def prune_export(name: str, src: Path, work: Path, logs: Path) -> dict:
    run = work / f"run-{name}"
    shutil.rmtree(run, ignore_errors=True)
    streamed = src.is_dir()
    recipe = recipe_file(work, name, streamed)
    init = child(birdbone("init", run, "--model", src, "-r", recipe), logs / f"{name}-init.log")
    prune = child(birdbone("prune", run), logs / f"{name}-prune.log")
    export = child(birdbone("export", run), logs / f"{name}-export.log")
    ok = init["exit"] == prune["exit"] == export["exit"] == 0
    out = {"streamed": streamed, "prune": prune, "export": export, "ok": ok,
           "seconds": round(prune["seconds"] + export["seconds"], 1),
           "peak_rss_bytes": max(prune["peak_rss_bytes"], export["peak_rss_bytes"])}
    if ok:
        steps = json.loads((run / "run.json").read_text())["steps"]
        out["sparsity"], out["gguf_bytes"] = steps["prune"]["sparsity"], steps["export"]["bytes"]
        out["streamed"] = bool(steps["prune"].get("streamed"))
        out["ledger_bytes"] = sum(f.stat().st_size for f in (run / "ledger").rglob("*") if f.is_file())
    shutil.rmtree(run, ignore_errors=True)           # the 3B run's pruned copy, delta and GGUF are ~20 GB
    return out


def quantize(name: str, src: Path, work: Path, logs: Path, in_memory: bool = False) -> dict:
    out = work / f"{name}-q.gguf"
    recipe = recipe_file(work, name, False)
    report = work / f"{name}-q.json"
    r = child(birdbone("quantize", src, "-o", out, "--bpw", 4.5, "-r", recipe, "--n-samples", N_SAMPLES,
                       "--report", report, *(["--in-memory"] if in_memory else [])),
              logs / f"{name}-quantize{'-in-memory' if in_memory else ''}.log")
    if r["exit"] == 0:
        r["gguf_bytes"] = out.stat().st_size
        r["streamed"] = bool(json.loads(report.read_text())["runtime"].get("streamed"))
        r["gguf_sha256"] = sha256_of(out)
    out.unlink(missing_ok=True)
    report.unlink(missing_ok=True)
    return r


def sha256_of(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def llmc_gptq(name: str, src: Path, work: Path, logs: Path) -> dict:
    """llm-compressor GPTQ W4A16 on the same calibration tokens (birdbone's calibration_blocks)."""
    from safetensors.torch import save_file

    from birdbone_core.data.text import calibration_blocks, read_text
    from birdbone_core.model.load import load_tokenizer

    text, _ = read_text(None, "calib")
    ids = calibration_blocks(load_tokenizer(src), text, N_SAMPLES, SEQ_LEN, 0)
    calib = work / f"{name}-calib.safetensors"
    save_file({"input_ids": ids.contiguous()}, str(calib))
    if not src.is_dir():                 # a GGUF: llm-compressor loads HF directories; convert once, untimed
        hf = work / f"{name}-hf"
        if not (hf / "config.json").is_file():
            from birdbone_core.model.load import load_model
            from birdbone_core.model.save import save_hf

            lm = load_model(str(src))
            save_hf(lm.model, lm.tokenizer, hf)
            del lm
        src = hf
    out = work / f"{name}-llmc-gptq.safetensors"
    r = child([str(LLMC_PY), str(ROOT / "tests" / "benchmarks" / "llmc" / "run_llmc.py"), "--model", str(src),
               "--calib", str(calib), "--method", "gptq", "--out", str(out)], logs / f"{name}-llmc-gptq.log")
    out.unlink(missing_ok=True)
    return r


def mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="gemma-3-270m,llama-3.2-1b,llama-3.2-3b")
    ap.add_argument("--work", type=Path, default=Path("/tmp/birdbone-scale"))
    ap.add_argument("--out", type=Path, default=RESULTS / "scale")
    ap.add_argument("--skip", default="", help="comma-separated jobs to skip: prune_export, quantize, llmc")
    ap.add_argument("--quantize-in-memory", action="store_true",
                    help="also run `birdbone quantize --in-memory` (the whole model in fp32) beside the streamed one")
    ap.add_argument("--merge", action="store_true",
                    help="keep OUT.json's other rows and jobs; replace only what this run measures")
    a = ap.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))
    a.work.mkdir(parents=True, exist_ok=True)
    logs = a.work / "logs"
    logs.mkdir(exist_ok=True)
    ram = mem_total()
    rows = []
    old_json = Path(f"{a.out}.json")
    if a.merge and old_json.is_file():
        rows = json.loads(old_json.read_text())["rows"]
    for name in a.models.split(","):
        src, n_params, stored = source_for(name, a.work)
        print(f"{name}: {n_params:,} parameters ({stored}) at {src}", flush=True)
        row = next((r for r in rows if r["model"] == name), None)
        if row is None:
            row = {"model": name}
            rows.append(row)
        row.update(parameters=n_params, stored=stored, fp32_bytes=4 * n_params)
        if "prune_export" not in skip:
            row["prune_export"] = prune_export(name, src, a.work, logs)
        if "quantize" not in skip:
            row["quantize"] = quantize(name, src, a.work, logs)
            if a.quantize_in_memory:
                row["quantize_in_memory"] = quantize(name, src, a.work, logs, in_memory=True)
        if "llmc" not in skip and name in ("gemma-3-270m", "llama-3.2-1b"):
            row["llmc_gptq_w4a16"] = llmc_gptq(name, src, a.work, logs) if LLMC_PY.is_file() else \
                {"skipped": "no .venv-llmc (make -C tests/benchmarks/llmc)"}
        write(rows, a.out, ram)
    print(f"wrote {a.out}.json / .md / .png")


def write(rows: list[dict], out: Path, ram: int) -> None:
    from scale_report import render_markdown, render_plot

    info = {"machine": f"{os.cpu_count()} CPU cores, {ram / GIB:.0f} GiB RAM, no GPU; {platform.platform()}",
            "calibration": f"{N_SAMPLES} x {SEQ_LEN} tokens", "date": time.strftime("%Y-%m-%d"), "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps(info, indent=2) + "\n")
    Path(f"{out}.md").write_text(render_markdown(info))
    render_plot(info, Path(f"{out}.png"))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))       # tests/: clitools
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    main()
