"""The harness's GGUF phases: every artifact here is a GGUF file scored by llama.cpp's own tools
(`llama-perplexity --kl-divergence` against the base's logits, `llama-bench`), with the wall time and
peak RSS (GNU time) of the run that wrote it.

    llamacpp_side(...)       base logits, llama-imatrix, llama.cpp's quants with and without the imatrix
    birdbone_gguf_side(...)  birdbone's SparseGPT 50% model as GGUF, llama-quantize'd to llama.cpp's types
    quantize_side(...)       `birdbone quantize` (grid-aware GPTQ + bit budget) on the dense model, its file
                             no larger than llama.cpp's +imatrix file at each point (both sizes recorded)

Each phase keeps its rows in a JSON file in --work and skips what is there, so a rerun resumes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from heavylock import heavy

from birdbone_core import atomic

BB_GGUF_JOB = ("sparsegpt", 0.5, "unstructured")  # birdbone's best one-shot method on Gemma (prune_methods results)
BBQ_CACHE = "birdbone-quantize.json"
KEEP = ("Q4_K_M",)  # GGUFs of this point stay in --work for inspection; the others are deleted once scored


def bb_gguf_path(work: Path, st: dict) -> Path:
    return work / f"bb-sparsegpt-50-{st['base_type'].lower()}.gguf"


def bbq_key(point: str) -> str:
    return f"birdbone quantize @ {point} size"


def _quantize_point(base: Path, out: Path, variant: str, imatrix: Path | None, threads: int):
    """llama-quantize for a reference.VARIANTS name or one of quant_vs_llamacpp's extra embedding points."""
    from quant_vs_llamacpp import _quantize_point as qp

    return qp(base, out, variant, imatrix, threads)


def llamacpp_side(prof: dict, work: Path, st: dict, ref, threads: int, variants: list[str], no_bench: bool) -> dict:
    """Base logits, imatrix, llama.cpp's quants with and without imatrix: size, ppl, KLD, speed."""
    cache = work / "llamacpp.json"
    done = json.loads(cache.read_text()) if cache.is_file() else {"rows": {}}
    base = work / st["base_gguf"]
    n_ctx = prof["n_ctx"]
    logits = work / f"base-c{n_ctx}.kld"
    if "kld_base" not in done:
        with heavy("llama-perplexity --kl-divergence-base"):
            ref.kld_base(base, work / "eval.txt", n_ctx, out=logits, chunks=prof["eval_chunks"], threads=threads)
        done["kld_base"] = ref.kld_base_info(logits)
    if "imatrix" not in done:
        with heavy("llama-imatrix"):
            imx = ref.llama_imatrix(base, work / "calib.txt", work / "imatrix.gguf", n_ctx=n_ctx,
                                    chunks=prof["imatrix_chunks"], threads=threads)
        done["imatrix"] = {"run": imx.run, "chunks": imx.chunks_processed}
    jobs = [("base", None, False)] + [(v, v, imx) for v in variants for imx in (False, True)]
    if st.get("source_gguf"):
        jobs.insert(1, ("as shipped", None, False))
    for name, variant, use_imx in jobs:
        key = f"{name}{' +imatrix' if use_imx else ''}"
        if key in done["rows"]:
            continue
        row: dict = {"tool": "llama.cpp", "artifact": key}
        if name == "base":
            path, row["stats"] = base, ref.gguf_stats(base)
            row["kld"] = {"ppl": done["kld_base"]["ppl"], "mean_kld": None}
        else:
            if name == "as shipped":
                path = Path(st["source_gguf"])
                row["stats"] = ref.gguf_stats(path)
            else:
                path = work / f"{variant}{'-imx' if use_imx else ''}.gguf"
                with heavy(f"llama-quantize {key}"):
                    q = _quantize_point(base, path, variant, work / "imatrix.gguf" if use_imx else None, threads)
                row["quantize"], row["stats"] = q.record()["run"], q.record()["stats"]
            with heavy(f"llama-perplexity --kl-divergence {key}"):
                row["kld"] = ref.kld(path, logits, threads=threads)
        row["stats"].pop("tensor_types", None)
        _bench(row, path, prof, ref, threads, no_bench, key)
        done["rows"][key] = row
        k = row["kld"]
        print(f"llama.cpp {key:>18}: {row['stats']['bpw']:.3f} bpw  ppl {k['ppl']:.4f}"
              + (f"  KLD {k['mean_kld']:.5f}" if k.get("mean_kld") is not None else ""), flush=True)
        if name not in ("base", "as shipped") and variant not in KEEP:
            path.unlink(missing_ok=True)  # keep disk use down
        cache.write_text(json.dumps(done, indent=2))
    return done


def _bench(row: dict, path: Path, prof: dict, ref, threads: int, no_bench: bool, key: str) -> None:
    if not no_bench:
        with heavy(f"llama-bench {key}"):
            row["bench"] = ref.bench(path, **dict(prof["bench"], threads=threads))


def birdbone_gguf_side(prof: dict, work: Path, st: dict, ref, threads: int, no_bench: bool) -> dict:
    """birdbone's SparseGPT 50% model as GGUF (exported by its pruning process): the base-type file itself and
    llama-quantize'd to sizes like llama.cpp's quants (with the base's imatrix), scored by llama-perplexity."""
    cache = work / "birdbone-gguf.json"
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    best_gguf, tag = bb_gguf_path(work, st), "SparseGPT 50%"
    if not best_gguf.is_file():
        return done
    logits = work / f"base-c{prof['n_ctx']}.kld"
    for qtype in [None] + list(prof["bb_quants"]):
        key = f"{tag} {best_gguf.stem.rsplit('-', 1)[-1].upper()}" if qtype is None else f"{tag} -> {qtype} +imatrix"
        if key in done:
            continue
        row: dict = {"tool": "birdbone", "artifact": key}
        if qtype is None:
            path = best_gguf
            info = json.loads((work / "candidates/birdbone-sparsegpt-unstructured-50.safetensors.json").read_text())
            row["export_s"] = info.get("gguf_export_s")
        else:
            path = work / f"bb-{qtype}.gguf"
            with heavy(f"llama-quantize birdbone {qtype}"):
                q = ref.quantize_variant(best_gguf, path, qtype, work / "imatrix.gguf", threads=threads)
            row["quantize"] = q.record()["run"]
        row["stats"] = {k: v for k, v in ref.gguf_stats(path).items() if k != "tensor_types"}
        with heavy(f"llama-perplexity --kl-divergence {key}"):
            row["kld"] = ref.kld(path, logits, threads=threads)
        _bench(row, path, prof, ref, threads, no_bench, key)
        done[key] = row
        print(f"birdbone {key}: {row['stats']['bpw']:.3f} bpw ppl {row['kld']['ppl']:.4f} KLD {row['kld']['mean_kld']:.5f}",
              flush=True)
        cache.write_text(json.dumps(done, indent=2))
    return done


# ------------------------------------------------------------------------------ birdbone quantize rows

def tensor_budget(target_file_bytes: int, base_file_bytes: int, base_tensor_bytes: int, tensor_names: list[str],
                  alignment: int = 32) -> int:
    """`birdbone quantize --bytes` (bytes of tensor data) so that its whole file stays <= target_file_bytes.
    The header (metadata, tokenizer, tensor infos) is the base GGUF's, which birdbone's exporter wrote with
    the same tokenizer and tensors; the quantized file adds the birdbone.quant.* keys (the types JSON,
    `"NAME":"Q4_K",` = len(NAME) + 10 bytes per tensor, plus a few short strings: 1 KiB) and up to
    alignment - 1 bytes of padding after each tensor."""
    header = base_file_bytes - base_tensor_bytes
    extra = sum(len(n) + 10 for n in tensor_names) + 1024 + alignment * len(tensor_names)
    return target_file_bytes - header - extra


def _birdbone_cli() -> list[str]:
    exe = Path(sys.executable).with_name("birdbone")  # the console script of the venv running the harness
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "birdbone_core.cli"]


def quantize_side(prof: dict, work: Path, st: dict, ref, lc: dict, model_path: str, threads: int,
                  torch_threads: int, no_bench: bool, run: bool = True) -> dict:
    """For each point of prof["bb_quantize"]: `birdbone quantize MODEL --bytes B` in its own process (GNU time:
    make s, peak RSS), B chosen so the file is no larger than llama.cpp's `<point> +imatrix` file; the file
    size is checked (one retry with a smaller budget if the header estimate fell short), then scored like
    every other GGUF. run=False: only the rows already in --work."""
    cache = work / BBQ_CACHE
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    if not run:
        return done
    base = ref.gguf_stats(work / st["base_gguf"])
    recipe = work / "bb-quantize-recipe.yaml"  # the harness's calibration: the same ids as every other tool
    n, seq = prof["calib"]
    atomic.write_text(recipe, f"calibration: {{n_samples: {n}, seq_len: {seq}, seed: 0}}\n")
    for point in prof.get("bb_quantize", []):
        key, lrow = bbq_key(point), lc["rows"].get(f"{point} +imatrix")
        if key in done:
            continue
        if lrow is None:
            print(f"{key}: no llama.cpp '{point} +imatrix' row to size it by; skipped", flush=True)
            continue
        target = lrow["stats"]["file_bytes"]
        out, rec_path = work / f"bbq-{point}.gguf", work / f"bbq-{point}.run.json"
        if not (out.is_file() and rec_path.is_file()):
            budget = tensor_budget(target, base["file_bytes"], base["tensor_bytes"], list(base["tensor_types"]))
            atomic.write_json(rec_path, _quantize_within(out, target, budget, model_path, recipe, ref, torch_threads))
        rec = json.loads(rec_path.read_text())
        stats = {k: v for k, v in ref.gguf_stats(out).items() if k != "tensor_types"}
        row: dict = {"tool": "birdbone", "artifact": key, "point": point, "target_file_bytes": target,
                     "target_row": f"{point} +imatrix", **rec, "stats": stats}
        with heavy(f"llama-perplexity --kl-divergence {key}"):
            row["kld"] = ref.kld(out, work / f"base-c{prof['n_ctx']}.kld", threads=threads)
        _bench(row, out, prof, ref, threads, no_bench, key)
        done[key] = row
        lk = (lrow.get("kld") or {}).get("mean_kld")
        print(f"{key}: {stats['file_bytes']:,} B (<= {target:,}) {stats['bpw']:.3f} bpw ppl {row['kld']['ppl']:.4f} "
              f"KLD {row['kld']['mean_kld']:.5f} (llama.cpp +imatrix {lk})", flush=True)
        atomic.write_json(cache, done)
        if point not in KEEP:
            out.unlink(missing_ok=True)
    return done


def _quantize_within(out: Path, target: int, budget: int, model_path: str, recipe: Path, ref, torch_threads: int) -> dict:
    """Run `birdbone quantize` until its file fits `target` bytes (at most two runs); the record of the runs."""
    runs = []
    for _ in range(2):
        report = out.with_suffix(".report.json")
        cmd = ["env", f"OMP_NUM_THREADS={torch_threads}", *_birdbone_cli(), "quantize", model_path, "-o", str(out),
               "--bytes", str(budget), "-r", str(recipe), "--report", str(report)]
        with heavy(f"birdbone quantize {out.stem}"):
            r = ref.run_tool(cmd)
        rep = json.loads(report.read_text())
        size = out.stat().st_size
        runs.append({"budget_bytes": budget, "file_bytes": size, "run": r.record()})
        if size <= target:
            return {"quantize": r.record(), "budget_bytes": budget, "file_bytes": size,
                    "tensor_bytes": rep["tensor_bytes"], "algorithm_s": rep["seconds"], "attempts": runs}
        budget -= size - target + 4096  # the header took more than estimated: shrink the tensor budget by the excess
    out.unlink(missing_ok=True)
    raise SystemExit(f"birdbone quantize: {out.name} stays larger than {target:,} B after {len(runs)} runs: {runs}")
