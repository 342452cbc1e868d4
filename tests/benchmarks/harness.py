"""The benchmark harness: birdbone side by side with llama.cpp and llm-compressor, one command, one table.

    .venv/bin/python tests/benchmarks/harness.py --model {fixture,gemma} --profile {quick,full} [--eval-text PATH]

Same model, same calibration blocks, same evaluation tokens, same machine, one run:
  * llama.cpp (tools built by llamacpp_tools.py): base GGUF, its own quants with and without an imatrix on
    the calibration text; size, bits per weight, perplexity, KL divergence and top-token agreement vs the
    base measured by llama-perplexity; llama-bench speed; wall time and peak RSS of every tool run.
  * birdbone: one-shot SparseGPT / Wanda at 50% unstructured and 2:4 (birdbone_core.prune, the code
    `birdbone compress` runs), each in its own process (wall time, peak RSS); the best 50% one is exported
    to GGUF and quantized by llama-quantize so it is scored by llama-perplexity next to llama.cpp's quants.
  * birdbone's quantizer: `birdbone quantize` (grid-aware GPTQ + bit budget) on the dense model at each quant
    point, its file no larger than llama.cpp's +imatrix file there, scored like llama.cpp's (harness_gguf.py).
  * llm-compressor 0.14 in its own venv (.venv-llmc, `make -C tests/benchmarks/llmc`): the same one-shot
    prunings plus GPTQ W4A16 group 128, on the same calibration token ids (tests/benchmarks/llmc/run_llmc.py).
  * every pruned/quantized candidate is scored by birdbone's evaluator (torch fp32, llama-perplexity's
    protocol) on exactly llama.cpp's evaluation chunks (read back from llama-perplexity's logits file,
    after checking birdbone's tokenizer gives the same tokens as llama.cpp's).
Writes results/harness-<model>-<profile>.{json,md} plus two plots (KLD vs bpw, perplexity vs sparsity).
Heavy jobs take /tmp/birdbone-heavy.lock one at a time (BIRDBONE_HEAVY_LOCK= to disable) and run niced.
Not part of the default test run; --work DIR keeps artifacts and resumes a killed run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import heavylock  # noqa: E402
from harness_gguf import BB_GGUF_JOB, BBQ_CACHE, bb_gguf_path, birdbone_gguf_side, llamacpp_side, quantize_side  # noqa: E402
from heavylock import heavy  # noqa: E402

FIXTURE = REPO / "tests/fixtures/tiny-llama"
LLMC_PY = REPO / ".venv-llmc/bin/python"
PRUNE_50 = [("sparsegpt", 0.5, "unstructured"), ("wanda", 0.5, "unstructured"),
            ("sparsegpt", 0.5, "2:4"), ("wanda", 0.5, "2:4")]
QUICK_VARIANTS = ["Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K", "Q4_0-pure"]
# issue 4's Gemma points beyond reference.VARIANTS (quant_vs_llamacpp.EXTRA_VARIANTS: embedding in Q4_0)
GEMMA_EXTRA = ["Q3_K_M-emb_q4_0", "Q2_K-emb_q4_0"]
GEMMA_BBQ = ["Q4_K_M", "Q3_K_M", "Q4_K_M-emb_q5_0", "Q4_K_M-emb_q4_0", "Q4_0-pure", *GEMMA_EXTRA]
# bb_quants: birdbone's pruned GGUF llama-quantize'd to these types; bb_quantize: points (llama.cpp variants,
# "all" = every variant the profile runs) where `birdbone quantize` makes a file no larger than llama.cpp's
PROFILES = {
    ("fixture", "quick"): dict(n_ctx=256, eval_chunks=40, calib=(32, 256), imatrix_chunks=64, variants=QUICK_VARIANTS,
                               prune=PRUNE_50, gptq=True, bench=dict(n_prompt=128, n_gen=32, reps=1),
                               bb_quants=["Q4_K_M", "Q3_K_M"], bb_quantize="all"),
    ("fixture", "full"): dict(n_ctx=256, eval_chunks=120, calib=(64, 256), imatrix_chunks=100, variants="all",
                              prune=PRUNE_50 + [("sparsegpt", 0.3, "unstructured"), ("wanda", 0.3, "unstructured"),
                                                ("sparsegpt", 0.7, "unstructured"), ("wanda", 0.7, "unstructured")],
                              gptq=True, bench=dict(n_prompt=256, n_gen=64, reps=3), bb_quants=["Q4_K_M", "Q3_K_M", "Q2_K"],
                              bb_quantize="all"),
    # Gemma quick: the 50% unstructured pair only (2:4 is in the full profile) and the two must-show quant points
    ("gemma", "quick"): dict(n_ctx=512, eval_chunks=4, calib=(16, 512), imatrix_chunks=16, variants=["Q4_K_M", "Q3_K_M"],
                             prune=PRUNE_50[:2], gptq=True, bench=dict(n_prompt=128, n_gen=32, reps=1),
                             bb_quants=["Q4_K_M", "Q3_K_M"], bb_quantize=["Q4_K_M", "Q3_K_M"]),
    ("gemma", "full"): dict(n_ctx=512, eval_chunks=16, calib=(64, 512), imatrix_chunks=64, variants="all",
                            extra_variants=GEMMA_EXTRA,
                            prune=PRUNE_50 + [("sparsegpt", 0.3, "unstructured"), ("sparsegpt", 0.7, "unstructured")],
                            gptq=True, bench=dict(n_prompt=512, n_gen=128, reps=3), bb_quants=["Q4_K_M", "Q3_K_M", "Q2_K"],
                            bb_quantize=GEMMA_BBQ),
}


def resolve_points(prof: dict, all_variants: list[str]) -> dict:
    """The profile with its llama.cpp variants and `birdbone quantize` points spelt out ("all" expanded)."""
    variants = (list(all_variants) if prof["variants"] == "all" else list(prof["variants"])) + prof.get("extra_variants", [])
    bbq = variants if prof.get("bb_quantize") == "all" else list(prof.get("bb_quantize", []))
    missing = [p for p in bbq if p not in variants]
    if missing:
        raise SystemExit(f"bb_quantize points {missing} are not among the profile's llama.cpp variants")
    return dict(prof, variants=variants, bb_quantize=bbq)


# ----------------------------------------------------------------------------------------- plumbing

def linear_names(model) -> list[str]:
    """Parameter names of the decoder layers' Linear weights (what both tools prune / quantize)."""
    import torch

    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


def read_logit_tokens(path: Path) -> tuple[int, int, list[int]]:
    """(n_ctx, n_chunk, tokens) from a `llama-perplexity --kl-divergence-base` file: the magic "_logits_",
    int32 n_ctx, n_vocab, n_chunk, then the n_ctx * n_chunk int32 token ids llama.cpp scored (before it
    puts BOS at the head of each chunk)."""
    import numpy as np

    with open(path, "rb") as f:
        head = f.read(20)
        if head[:8] != b"_logits_":
            raise ValueError(f"{path} is not a llama-perplexity logits file")
        n_ctx, _, n_chunk = (int.from_bytes(head[i:i + 4], "little", signed=True) for i in (8, 12, 16))
        toks = np.frombuffer(f.read(4 * n_ctx * n_chunk), dtype="<i4")
    return n_ctx, n_chunk, toks.tolist()


def token_check(birdbone_ids: list[int], llama_tokens: list[int], bos: int | None) -> dict:
    """Does llama.cpp's token stream equal birdbone's ([BOS] + text tokens when the model adds BOS)?"""
    expect = ([bos] if bos is not None else []) + list(birdbone_ids)
    n = len(llama_tokens)
    same = sum(1 for a, b in zip(expect[:n], llama_tokens) if a == b)
    first_diff = next((i for i, (a, b) in enumerate(zip(expect[:n], llama_tokens)) if a != b), None)
    return {"n_compared": n, "n_equal": same, "equal_fraction": same / max(n, 1), "first_difference": first_diff,
            "identical": same == n and len(expect) >= n}


# ------------------------------------------------------------------------------ birdbone worker mode

def worker_birdbone(a) -> None:
    """One birdbone one-shot prune in this process: load the base copy, prune, save the linear weights."""
    import resource

    import torch
    from safetensors.torch import load_file, save_file

    from birdbone_core.model.load import load_model
    from birdbone_core.prune.sequential import prune_sequential
    from birdbone_core.recipe import parse_recipe

    t0 = time.perf_counter()
    lm = load_model(a.worker_model)
    load_s = time.perf_counter() - t0
    blocks = load_file(a.worker_calib)["input_ids"]
    recipe = {"prune": {"method": a.worker_method, "sparsity": a.worker_sparsity, "pattern": a.worker_pattern}}
    cfg = parse_recipe(recipe).prune
    rep = prune_sequential(lm.model, blocks, cfg, description=a.worker_method)
    params = dict(lm.model.named_parameters())
    out = {n: params[n].detach().float().contiguous() for n in linear_names(lm.model)}
    zeros = sum(int((w == 0).sum()) for w in out.values())
    total = sum(w.numel() for w in out.values())
    tmp = Path(a.worker_out + ".tmp")
    save_file(out, str(tmp))
    tmp.rename(a.worker_out)
    export_s = None
    if a.worker_gguf:  # what `birdbone compress` hands to llama.cpp: the pruned model as a GGUF file
        from birdbone_core.export.gguf_file import export_gguf

        t1 = time.perf_counter()
        tmp = Path(a.worker_gguf).with_suffix(".tmp.gguf")
        export_gguf(lm.model, lm.tokenizer, tmp, out_type=a.worker_gguf_type,
                    source_gguf=Path(a.worker_source_gguf) if a.worker_source_gguf else None)
        tmp.rename(a.worker_gguf)
        export_s = round(time.perf_counter() - t1, 2)
    info = {"tool": "birdbone", "recipe": recipe, "gguf_export_s": export_s, "n_samples": int(blocks.shape[0]), "seq_len": int(blocks.shape[1]),
            "load_s": round(load_s, 2), "oneshot_s": round(rep.seconds, 2), "zeros_fraction": zeros / total,
            "n_weights": total, "torch_threads": torch.get_num_threads(),
            "peak_rss_self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    Path(a.worker_out + ".json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))


# --------------------------------------------------------------------------------------- the phases

def prepare(a, prof: dict, work: Path, ref) -> dict:
    """Load the model once (birdbone's loader): base GGUF for llama.cpp, a safetensors copy + tokenizer for
    the pruning processes, calibration blocks, texts."""
    from safetensors.torch import save_file

    from birdbone_core.data.text import bos_id, calibration_blocks, read_text, tokenize
    from birdbone_core.export.gguf_file import export_gguf
    from birdbone_core.model.load import load_model
    from birdbone_core.model.save import save_hf

    state_file = work / "prepared.json"
    if state_file.is_file():
        return json.loads(state_file.read_text())
    calib_text, calib_desc = read_text(None, "calib")
    eval_text, eval_desc = read_text(a.eval_text, "eval")
    (work / "calib.txt").write_text(calib_text, encoding="utf-8")
    (work / "eval.txt").write_text(eval_text, encoding="utf-8")
    with heavy("prepare: load, export base GGUF, save safetensors copy"):
        t0 = time.perf_counter()
        lm = load_model(a.model_path)
        load_s = time.perf_counter() - t0
        src_gguf = Path(a.model_path) if str(a.model_path).endswith(".gguf") else None
        out_type = "f16" if src_gguf else "f32"
        t0 = time.perf_counter()
        base = work / f"base-{out_type}.gguf"
        export_gguf(lm.model, lm.tokenizer, base, out_type=out_type, source_gguf=src_gguf)
        export_s = time.perf_counter() - t0
        save_hf(lm.model, lm.tokenizer, work / "base-hf")
        n, seq = prof["calib"]
        blocks = calibration_blocks(lm.tokenizer, calib_text, n, seq, 0)
        save_file({"input_ids": blocks.contiguous()}, str(work / "calib.safetensors"))
        ids = tokenize(lm.tokenizer, eval_text).tolist()
        bos = bos_id(lm.tokenizer)
    (work / "eval-ids.json").write_text(json.dumps(ids))
    st = {"base_gguf": base.name, "base_type": out_type.upper(), "load_s": round(load_s, 1), "export_s": round(export_s, 1),
          "calib": {"description": calib_desc, "n_samples": n, "seq_len": seq, "seed": 0},
          "eval": {"description": eval_desc, "n_tokens_birdbone": len(ids)}, "bos": bos,
          "n_params": sum(p.numel() for p in lm.model.parameters()), "model_type": lm.model_type,
          "source_gguf": str(src_gguf) if src_gguf else None}
    del lm
    state_file.write_text(json.dumps(st, indent=2))
    return st


def produce(prof: dict, work: Path, st: dict, ref, threads: int, tools: tuple[str, ...],
            methods: tuple[str, ...] = ("sparsegpt", "wanda", "gptq"), run: bool = True) -> list[dict]:
    """Each pruning / quantization job in its own process: wall time and peak RSS by GNU time.
    run=False: only collect the jobs already done in `work`."""
    jobs = [("birdbone", m, s, p) for m, s, p in prof["prune"]] if "birdbone" in tools else []
    if "llm-compressor" in tools:
        jobs += [("llm-compressor", m, s, p) for m, s, p in prof["prune"]]
        if prof["gptq"]:
            jobs.append(("llm-compressor", "gptq", 0.0, "W4A16 g128"))
    jobs = [j for j in jobs if j[1] in methods]
    out = []
    for tool in dict.fromkeys(j[0] for j in jobs):
        with heavy(f"{tool} one-shot jobs"):
            out += _produce_tool(work, st, ref, threads, [j for j in jobs if j[0] == tool], run)
    return out


def _produce_tool(work: Path, st: dict, ref, threads: int, jobs: list[tuple], run: bool = True) -> list[dict]:
    out = []
    for tool, method, sparsity, pattern in jobs:
        tag = f"{tool}-{method}-{pattern.replace(':', 'of').replace(' ', '_')}" + (f"-{int(sparsity * 100)}" if sparsity else "")
        dest = work / "candidates" / f"{tag}.safetensors"
        dest.parent.mkdir(exist_ok=True)
        rec_path = Path(str(dest) + ".run.json")
        if not run and not (dest.is_file() and rec_path.is_file()):
            continue
        if not (dest.is_file() and rec_path.is_file()):
            if tool == "birdbone":
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--worker-model", str(work / "base-hf"),
                       "--worker-calib", str(work / "calib.safetensors"), "--worker-method", method,
                       "--worker-sparsity", str(sparsity), "--worker-pattern", pattern, "--worker-out", str(dest)]
                if (method, sparsity, pattern) == BB_GGUF_JOB:
                    cmd += ["--worker-gguf", str(bb_gguf_path(work, st)), "--worker-gguf-type", st["base_type"].lower()]
                    if st.get("source_gguf"):
                        cmd += ["--worker-source-gguf", st["source_gguf"]]
            else:
                if not LLMC_PY.is_file():
                    raise SystemExit(f"{LLMC_PY} missing: run `make -C tests/benchmarks/llmc` (or pass --skip-llmc)")
                cmd = [str(LLMC_PY), str(HERE / "llmc/run_llmc.py"), "--model", str(work / "base-hf"),
                       "--calib", str(work / "calib.safetensors"), "--method", method, "--out", str(dest)]
                if method != "gptq":
                    cmd += ["--sparsity", str(sparsity), "--pattern", pattern]
            if threads:
                cmd = ["env", f"OMP_NUM_THREADS={threads}", *cmd]
            with heavy(f"{tool} {method} {pattern}"):
                r = ref.run_tool(cmd)
            rec_path.write_text(json.dumps(r.record()))
        rec = json.loads(rec_path.read_text())
        info = json.loads(Path(str(dest) + ".json").read_text())
        out.append({"tool": tool, "method": method, "sparsity_target": sparsity, "pattern": pattern, "file": str(dest),
                    "tag": tag, "run": rec, "info": info})
        print(f"{tool} {method} {pattern}: {rec['wall_s']:.1f} s wall, {rec['peak_rss_mib']:.0f} MiB peak, "
              f"zeros {info['zeros_fraction']:.3f}", flush=True)
    return out


def evaluate_all(prof: dict, work: Path, st: dict, cands: list[dict]) -> dict:
    """birdbone's evaluator on llama.cpp's own evaluation chunks: dense, then each candidate."""
    import torch
    from safetensors.torch import load_file, save_file

    from birdbone_core.eval.perplexity import evaluate
    from birdbone_core.model.load import load_model

    cache = work / "torch-eval.json"
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    n_ctx, n_chunk, toks = read_logit_tokens(work / f"base-c{prof['n_ctx']}.kld")
    ids = json.loads((work / "eval-ids.json").read_text())
    done["token_check"] = token_check(ids, toks, st["bos"])
    chunks = torch.tensor(toks, dtype=torch.long).view(n_chunk, n_ctx)
    if st["bos"] is not None:
        chunks[:, 0] = st["bos"]  # what llama-perplexity does to each chunk's head
    todo = [c for c in cands if c["tag"] not in done]
    if "dense" in done and not todo:
        return done  # everything measured already (a rerun that only rewrites the report)
    lm = load_model(str(work / "base-hf"))
    params = dict(lm.model.named_parameters())
    names = linear_names(lm.model)
    hidden_file = work / "dense-hidden.safetensors"
    if "dense" in done and hidden_file.is_file():
        ref_hidden = load_file(str(hidden_file))["hidden"]
    else:
        with heavy("torch eval: dense"):
            dense, ref_hidden = evaluate(lm.model, chunks, description="dense")
        done["dense"] = dense.as_dict()
        save_file({"hidden": ref_hidden.contiguous()}, str(hidden_file))
    for c in todo:
        w = load_file(c["file"])
        if sorted(w) != sorted(names):
            raise SystemExit(f"{c['file']}: weights {sorted(set(w) ^ set(names))[:3]} do not match the model's linears")
        with torch.no_grad():
            for n in names:
                params[n].copy_(w[n].to(params[n].dtype))
        with heavy(f"torch eval: {c['tag']}"):
            res, _ = evaluate(lm.model, chunks, reference_hidden=ref_hidden, description=c["tag"])
        done[c["tag"]] = res.as_dict()
        print(f"eval {c['tag']}: ppl {res.ppl:.4f} KLD {res.kld:.5f} top1 {res.top1:.4f}", flush=True)
        cache.write_text(json.dumps(done, indent=2))
    cache.write_text(json.dumps(done, indent=2))
    del lm
    return done


# --------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["fixture", "gemma"], default="fixture")
    ap.add_argument("--profile", choices=["quick", "full"], default="quick")
    ap.add_argument("--eval-text", default=None, help="any text file (.txt/.jsonl[.gz]); default: built-in held-out slice")
    ap.add_argument("--work", default=None, help="artifact folder; kept, and a rerun resumes from it")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--threads", type=int, default=1, help="threads for the llama.cpp tools (-t)")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch threads for pruning, llm-compressor and evaluation (default: --threads)")
    ap.add_argument("--skip-llmc", action="store_true", help="leave out llm-compressor")
    ap.add_argument("--no-bench", action="store_true", help="skip llama-bench")
    ap.add_argument("--report-only", action="store_true",
                    help="write the report from what --work already holds (a partial run), running nothing")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for k in ("model", "calib", "method", "pattern", "out", "gguf", "gguf-type", "source-gguf"):
        ap.add_argument(f"--worker-{k}", help=argparse.SUPPRESS)
    ap.add_argument("--worker-sparsity", type=float, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker_birdbone(a)

    import harness_report
    import llamacpp_tools
    import reference as ref
    import run_reference

    t_start = time.perf_counter()
    if os.nice(0) < 10:
        os.nice(10 - os.nice(0))
    a.torch_threads = a.torch_threads or a.threads
    os.environ["OMP_NUM_THREADS"] = str(a.torch_threads)
    import torch

    torch.set_num_threads(a.torch_threads)
    prof = resolve_points(PROFILES[(a.model, a.profile)], list(ref.VARIANTS))
    heavylock.LOCK_ALL = a.model != "fixture"
    variants = prof["variants"]
    if a.model == "fixture":
        a.model_path = str(FIXTURE)
    else:
        from birdbone_core.model.default import default_model_path

        a.model_path = str(default_model_path())
    mach = run_reference.machine()
    llamacpp_tools.build()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix=f"birdbone-harness-{a.model}-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"harness: model {a.model} ({a.model_path}), profile {a.profile}, work {work}", flush=True)
    try:
        versions = (ref.tool_version(), run_reference.package_versions(), llmc_versions())

        def report(stage: str, lc, cands, tev, bbg, bbq) -> None:  # after every phase: a killed run still leaves a table
            mach["loadavg_end"] = list(os.getloadavg())
            doc = harness_report.assemble(a, prof, variants, st, lc, cands, tev, bbg, bbq, mach, *versions,
                                          time.perf_counter() - t_start)
            doc["complete"], doc["stage"] = stage == "done", stage
            harness_report.write(doc, Path(a.out), work, REPO)

        if a.report_only:
            if not (work / "prepared.json").is_file():
                raise SystemExit(f"{work}: nothing prepared yet")
            def cached(name: str, empty: dict) -> dict:
                return json.loads((work / name).read_text()) if (work / name).is_file() else empty

            st, lc = cached("prepared.json", {}), cached("llamacpp.json", {"rows": {}})
            cands = produce(prof, work, st, ref, a.torch_threads, ("birdbone", "llm-compressor"), run=False)
            tev, bbg, bbq = cached("torch-eval.json", {}), cached("birdbone-gguf.json", {}), cached(BBQ_CACHE, {})
            expected = len(prof["prune"]) * (1 if a.skip_llmc else 2) + (0 if a.skip_llmc or not prof["gptq"] else 1)
            done = (len(lc.get("rows", {})) and len(cands) == expected and all(c["tag"] in tev for c in cands)
                    and len(bbq) == len(prof["bb_quantize"]))
            report("done" if done else "partial (report written from --work by --report-only)", lc, cands, tev, bbg, bbq)
            return
        # Phases in order of what the comparison needs most, under one hold of the heavy lock (each new
        # acquisition waits behind other users' whole jobs); a report is written after the first phases.
        outer = heavy("the whole harness run")
        outer.__enter__()
        with heavy("prepare + llama.cpp references"):
            st = prepare(a, prof, work, ref)
            lc = llamacpp_side(prof, work, st, ref, a.threads, variants, a.no_bench)
        with heavy("birdbone quantize at llama.cpp's sizes"):
            bbq = quantize_side(prof, work, st, ref, lc, a.model_path, a.threads, a.torch_threads, a.no_bench)
        report("llama.cpp + birdbone quantize produced", lc, [], {}, {}, bbq)
        with heavy("birdbone SparseGPT jobs + its GGUF rows"):
            cands = produce(prof, work, st, ref, a.torch_threads, ("birdbone",), ("sparsegpt",))
            bbg = birdbone_gguf_side(prof, work, st, ref, a.threads, a.no_bench)
        report("llama.cpp + birdbone quantize + birdbone SparseGPT produced", lc, cands, {}, bbg, bbq)
        # Then rounds (llm-compressor SparseGPT + GPTQ; Wanda for both tools), each followed by the
        # evaluation of everything produced so far, so a run cut short still has head-to-head numbers.
        llmc = () if a.skip_llmc else ("llm-compressor",)
        rounds = [(llmc, ("sparsegpt", "gptq")), (("birdbone",) + llmc, ("wanda",))]
        for i, (tools, methods) in enumerate(rounds):
            if tools:
                cands += produce(prof, work, st, ref, a.torch_threads, tools, methods)
            with heavy("torch evaluation"):
                tev = evaluate_all(prof, work, st, cands)
            if i < len(rounds) - 1:
                report(f"evaluated after llm-compressor {'+'.join(methods)}", lc, cands, tev, bbg, bbq)
        outer.__exit__(None, None, None)
        order = {c["tag"]: k for k, c in enumerate(cands)}  # table order: tool, then the profile's job order
        cands.sort(key=lambda c: (c["tool"] != "birdbone", [j[:3] for j in prof["prune"]].index(
            (c["method"], c["sparsity_target"], c["pattern"])) if c["method"] != "gptq" else 99, order[c["tag"]]))
        report("done", lc, cands, tev, bbg, bbq)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


def llmc_versions() -> dict:
    """Package versions inside .venv-llmc (pip's own view), or {} when that venv is absent."""
    import subprocess

    if not LLMC_PY.is_file():
        return {}
    code = ("import json; from importlib.metadata import version as v; print(json.dumps({p: v(p) for p in "
            "('llmcompressor','compressed-tensors','transformers','torch','datasets','accelerate')}))")
    r = subprocess.run([str(LLMC_PY), "-c", code], capture_output=True, text=True, timeout=120)
    return json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr[-300:]}


if __name__ == "__main__":
    main()
