"""The steps of a run. Each reads the run directory (birdbone_core.run), does one thing, and writes its
outputs atomically, so any step can run in its own process (or container) and be retried after a crash.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from birdbone_core import atomic, stream_steps
from birdbone_core.data.text import calibration_blocks, evaluation_chunks, read_text
from birdbone_core.errors import BirdboneError
from birdbone_core.eval.perplexity import (
    EvalResult,
    check_n_ctx,
    evaluate,
    score_hidden,
    streamed_hidden_states,
)
from birdbone_core.ledger import Ledger, state_of
from birdbone_core.model.load import LoadedModel
from birdbone_core.model.save import save_hf
from birdbone_core.model.stream import streamable
from birdbone_core.prune.sequential import check_pattern, count_zeros, prune_sequential
from birdbone_core.recipe import Recipe
from birdbone_core.run import Run
from birdbone_core.run_init import ensure_structured, load_model_for, load_step_model, load_with_options
from birdbone_core.runtime import Placement, describe


def _file_size(path: Path) -> int:
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.glob("*.safetensors"))
    return p.stat().st_size


def step_baseline(run: Run, lm: LoadedModel | None = None) -> EvalResult:
    """Tokenize the evaluation text and score the dense model; keep its hidden states for KL later."""
    recipe = run.recipe()
    ev = recipe.evaluation
    text, text_desc = read_text(ev.text, "eval")
    if lm is None:
        ensure_structured(run)
    if lm is None and streamable(run.base_spec()):      # one layer at a time
        sm, tokenizer = stream_steps.open_base(run)
        check_n_ctx(sm.model, ev.n_ctx)
        check_pattern(sm.model, recipe.prune)
        chunks = evaluation_chunks(tokenizer, text, ev.n_ctx, ev.max_chunks)
        hidden = streamed_hidden_states(sm, chunks, "scoring base model")
        result, runtime = score_hidden(sm.model, hidden, chunks), describe(sm.model)
    else:
        lm = lm or load_model_for(run)
        check_n_ctx(lm.model, ev.n_ctx)
        check_pattern(lm.model, recipe.prune)          # the first step that has the model: refuse before any work
        chunks = evaluation_chunks(lm.tokenizer, text, ev.n_ctx, ev.max_chunks)
        result, hidden = evaluate(lm.model, chunks, description="scoring base model")
        runtime = describe(lm.model)
    if not math.isfinite(result.ppl):
        raise BirdboneError(f"{run.base_spec()}: the base model scores perplexity {result.ppl} (its outputs "
                            f"hold NaN/Inf); check its weights and config")
    with atomic.staged_dir(run.baseline_dir) as tmp:
        save_file({"chunks": chunks.contiguous(), "hidden": hidden.contiguous()}, str(tmp / run.reference_path.name))
        atomic.write_json(tmp / "eval.json", {"text": text_desc, **result.as_dict()})
    run.mark_done("baseline", {"ppl": result.ppl, "n_scored": result.n_scored, "text": text_desc,
                               "reference_sha256": atomic.sha256_file(run.reference_path),
                               "runtime": runtime})
    return result


def _check_finite(lm: LoadedModel) -> None:
    bad = [n for n, p in lm.model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise BirdboneError(f"pruning produced NaN/Inf in {bad[0]} (and {len(bad) - 1} more); nothing was saved")


def step_prune(run: Run, lm: LoadedModel | None = None) -> LoadedModel | None:
    """One-shot layer-by-layer pruning on the calibration text; writes RUN/pruned/ and records the change
    in the ledger. (A recipe with `waves:` prunes through birdbone_core.loop: birdbone_core.compress.)"""
    recipe = run.recipe()
    if recipe.waves is not None:   # birdbone_core.compress.prune runs those through the loop
        raise BirdboneError(f"{run.root}: the recipe prunes in waves; its steps are the loop's (birdbone run)")
    if lm is None:
        ensure_structured(run)
        if streamable(run.base_spec()):
            return stream_steps.prune(run, recipe)
    lm = lm or load_model_for(run)
    cal = recipe.calibration
    text, text_desc = read_text(cal.text, "calib")
    blocks = calibration_blocks(lm.tokenizer, text, cal.n_samples, cal.seq_len, cal.seed)
    ledger = Ledger(run.root)
    before = {n: t.clone() for n, t in state_of(lm.model).items()}     # the base, for the ledger
    ledger.init_base(before, meta={"source": run.manifest()["model"]})
    report = prune_sequential(lm.model, blocks, recipe.prune,
                              description=f"{recipe.prune.method} {recipe.prune.pattern}")
    _check_finite(lm)
    rep = stream_steps.prune_record(run, recipe, report, text_desc, describe(lm.model), streamed=False)
    # wave 1 of the ledger: the sparse change base -> pruned (a retried step records nothing new)
    ledger.record_wave(1, before, state_of(lm.model), metrics={"linear_sparsity": rep.sparsity},
                       decision=f"one-shot {report.method} {report.pattern}")
    del before
    save_hf(lm.model, lm.tokenizer, run.pruned_dir)
    stream_steps.finish_prune(run, rep)
    return lm


def step_export(run: Run, lm: LoadedModel | None = None):
    """Write the pruned model as a GGUF of the recipe's type (or mixed types, recipe `quantize:`)."""
    from collections import Counter

    from birdbone_core.export.gguf_file import export_gguf

    run.require("prune", "export")
    t0 = time.perf_counter()
    recipe = run.recipe()
    m = run.manifest()
    source_gguf = run.tokenizer_gguf()
    meta = {"birdbone.recipe_sha256": m["recipe_sha256"], "birdbone.prune.method": recipe.prune.method,
            "birdbone.prune.pattern": recipe.prune.pattern}
    if recipe.quantize is not None:  # mixed types under a bit budget (birdbone_core.quant)
        from birdbone_core.quant.pipeline import quantize_and_export

        if lm is None and streamable(run.pruned_dir):     # one decoder layer in memory at a time
            from birdbone_core.model.load import open_streamed

            model, tokenizer = open_streamed(str(run.pruned_dir), run.placement(), keep_dtype=True)
        else:
            lm = lm or load_step_model(str(run.pruned_dir), "pruned model", placement=run.placement(), keep_dtype=True)
            model, tokenizer = lm.model, lm.tokenizer
        result, q = quantize_and_export(model, tokenizer, recipe.quantize, run.gguf_path(recipe),
                                        calibration=recipe.calibration, source_gguf=source_gguf,
                                        extra_metadata=meta, report_path=run.root / "quant_report.json",
                                        source_bytes=_file_size(m["model"]["path"]) if m["model"]["kind"] != "hub" else None)
        info = {"types": dict(Counter(q.types.values())), "budget_bytes": q.budget_bytes}
        if lm is None:
            info.update(runtime={"device": str(model.device), "dtype": str(model.dtype).removeprefix("torch.")},
                        streamed=True)
    elif lm is None and streamable(run.pruned_dir):   # one tensor at a time from RUN/pruned/
        from birdbone_core.model.load import load_tokenizer
        from birdbone_core.model.stream import StreamedModel

        sm = StreamedModel.open(run.pruned_dir, Placement(torch.device("cpu"), run.placement().dtype),
                                keep_dtype=True, materialize=False)
        result = export_gguf(sm.model, load_tokenizer(run.pruned_dir), run.gguf_path(recipe),
                             out_type=recipe.export.type, source_gguf=source_gguf, extra_metadata=meta,
                             state=sm.checkpoint_state())
        info = {"runtime": {"device": "cpu", "dtype": str(sm.dtype).removeprefix("torch.")}, "streamed": True}
    else:
        lm = lm or load_step_model(str(run.pruned_dir), "pruned model", placement=run.placement(), keep_dtype=True)
        result = export_gguf(lm.model, lm.tokenizer, run.gguf_path(recipe), out_type=recipe.export.type,
                             source_gguf=source_gguf, extra_metadata=meta)
        info = {}
    if lm is not None:
        info["runtime"] = describe(lm.model)
    run.mark_done("export", {"path": str(result.path), "bytes": result.n_bytes,
                             "bits_per_weight": result.bits_per_weight, **info})
    _push(run, "export", {"bits_per_weight": result.bits_per_weight, "size_bytes": result.n_bytes},
          time.perf_counter() - t0)
    return result


def _push(run: Run, step: str, metrics: dict, seconds: float) -> None:
    """Step metrics to the Pushgateway when one is configured (birdbone_core.ops.metrics; no-op otherwise)."""
    import importlib.util

    if importlib.util.find_spec("birdbone_core.ops.metrics"):
        from birdbone_core.ops.metrics import push_step

        push_step(run.root, step, None, metrics, seconds)


def _llamacpp_ppl(gguf: Path, chunks: torch.Tensor) -> float | None:
    """Perplexity of the GGUF by llama.cpp on the very same token chunks, when llama-cpp-python is installed."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None
    from birdbone_core.eval.llamacpp import llama_perplexity

    n_ctx = chunks.shape[1]
    ppl, _ = llama_perplexity(gguf, chunks.reshape(-1).tolist(), n_ctx)
    return ppl


def step_evaluate(run: Run, lm: LoadedModel | None = None) -> dict:
    """Score the pruned model against the baseline (perplexity, KL, top-1) and the GGUF in llama.cpp."""
    run.require("baseline", "evaluate")
    run.require("prune", "evaluate")
    t0 = time.perf_counter()
    recipe = run.recipe()
    ref = run.reference()
    base_eval = json.loads((run.baseline_dir / "eval.json").read_text())
    ev = recipe.evaluation
    if lm is None and streamable(run.pruned_dir) and not (ev.tasks or ev.canaries):   # one layer at a time
        from birdbone_core.model.stream import StreamedModel

        sm = StreamedModel.open(run.pruned_dir, run.placement(), keep_dtype=True)
        hidden = streamed_hidden_states(sm, ref["chunks"], "scoring pruned model")
        result = score_hidden(sm.model, hidden, ref["chunks"], ref["hidden"])
        zeros, total = count_zeros(sm.model, state=sm.checkpoint_state())
        runtime = describe(sm.model)
    else:
        lm = lm or load_step_model(str(run.pruned_dir), "pruned model", placement=run.placement(), keep_dtype=True)
        result, _ = evaluate(lm.model, ref["chunks"], reference_hidden=ref["hidden"],
                             description="scoring pruned model")
        zeros, total = count_zeros(lm.model)
        runtime = describe(lm.model)
    if not math.isfinite(result.ppl):
        raise BirdboneError(f"{run.pruned_dir}: the compressed model scores perplexity {result.ppl} (its outputs "
                            f"hold NaN/Inf); not writing metrics")
    m = run.manifest()
    gguf = run.gguf_path(recipe)
    llama_ppl = _llamacpp_ppl(gguf, ref["chunks"]) if gguf.is_file() else None
    base_path = Path(run.base_spec())
    base_llama_ppl = (_llamacpp_ppl(base_path, ref["chunks"]) if m["model"]["kind"] == "gguf"
                      and recipe.structure is None else None)
    metrics = {
        "recipe": recipe.name, "recipe_sha256": m["recipe_sha256"], "eval_text": base_eval["text"],
        "n_ctx": result.n_ctx, "n_scored": result.n_scored,
        "base": {"path": str(base_path), "bytes": _file_size(base_path),
                 "ppl": base_eval["ppl"], "ppl_llamacpp": base_llama_ppl},
        "compressed": {"path": str(gguf) if gguf.is_file() else None,
                       "bytes": gguf.stat().st_size if gguf.is_file() else None,
                       "gguf_type": "mixed" if recipe.quantize is not None else recipe.export.type,
                       "sparsity": zeros / max(total, 1),
                       "ppl": result.ppl, "ppl_llamacpp": llama_ppl, "kld": result.kld, "top1": result.top1},
    }
    if recipe.structure is not None:   # base = the cut model; the source and the cut's cost, from `structure`
        metrics["source"] = {"path": run.model_spec(), "bytes": _file_size(Path(run.model_spec()))}
        metrics["structure"] = run.manifest()["steps"].get("structure")
    accuracy = _final_accuracy(run, recipe, lm)
    if accuracy is not None:
        metrics["accuracy"] = accuracy
    atomic.write_json(run.metrics_path, metrics)
    run.mark_done("evaluate", {"ppl": result.ppl, "kld": result.kld, "runtime": runtime})
    _push(run, "evaluate", {"perplexity": result.ppl, "kld": result.kld, "top1": result.top1,
                            "sparsity": zeros / max(total, 1)}, time.perf_counter() - t0)
    return metrics


def _final_accuracy(run: Run, recipe: Recipe, lm: LoadedModel) -> dict | None:
    """Base vs compressed task accuracy (with lm-eval's stderr) and canaries, when the recipe asks for them.
    The base side was scored by `prepare` (RUN/prepare/prepare.json); a run without it scores the base now."""
    from birdbone_core.eval.tasks import accuracy_for, compare

    ev = recipe.evaluation
    if not ev.tasks and not ev.canaries:
        return None
    online = bool(run.load_options().get("online"))
    prep = run.root / "prepare" / "prepare.json"
    base = json.loads(prep.read_text()).get("accuracy") if prep.is_file() else None
    if base is None:
        base_lm = load_with_options(run.base_spec(), run.load_options(), run.placement())
        base = accuracy_for(base_lm.model, base_lm.tokenizer, ev, online)
        del base_lm
    final = accuracy_for(lm.model, lm.tokenizer, ev, online)
    return {"base": base, "compressed": final, "deltas": compare(base, final),
            "failed_canaries": final.get("failed_canaries", [])}


def revert(run: Run, wave: int, out_dir: Path) -> Path:
    """Rebuild the exact weights after `wave` (0 = base) from the base plus the ledger's deltas and write
    them as a transformers directory; every tensor is checked against the recorded hashes."""
    ledger = Ledger(run.root)
    if not ledger.exists():
        raise BirdboneError(f"{run.root}: this run has no ledger yet (run `birdbone prune` first)")
    if not 0 <= wave <= ledger.last_wave:
        raise BirdboneError(f"{run.root}: no wave {wave}; the ledger holds waves 0..{ledger.last_wave}")
    atomic.check_output_dir(out_dir, "reverted model", not_within=run.root)
    # on the CPU, in the dtype the ledger recorded the base in (a run pruned on CUDA holds bf16 weights)
    floats = {r.dtype for r in ledger.entry(0).tensors.values()} & {"float32", "bfloat16", "float16"}
    cpu = Placement(torch.device("cpu"), floats.pop() if len(floats) == 1 else "float32")
    if streamable(run.base_spec()):         # one tensor at a time
        stream_steps.revert(run, ledger, wave, cpu, out_dir)
        return out_dir
    lm = load_step_model(run.base_spec(), "base model", run.load_options(), cpu)
    state = ledger.state_at(wave, state_of(lm.model))
    lm.model.load_state_dict(state, strict=True)
    save_hf(lm.model, lm.tokenizer, out_dir, mark=True)
    return out_dir
