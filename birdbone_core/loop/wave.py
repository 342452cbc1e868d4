"""One wave of the adaptive loop as five steps, each its own CLI invocation (`birdbone wave RUN K STEP`):

    prune     raise every target module to the wave's cumulative sparsity; usage statistics are collected
              on the current (healed) model. One-shot recipes: the whole prune, as wave 1 of 1.
    heal      train back toward the dense model (heal section, tapered over waves); masks enforced
    regrow    no-op record (the recipe has no regrowth section yet)
    evaluate  validation perplexity / KL / top-1, non-finite weights, per-layer sparsity
    decide    the stop-loss verdict; records wave K in the ledger; writes waves/K/decision.json

Each step reads its input weights from the run directory (ledger state after wave K-1 + this wave's
latest overlay) and writes an overlay of the tensors it changed, then its marker.
"""
from __future__ import annotations

import math
import os
import time

from birdbone_core.errors import BirdboneError
from birdbone_core.eval.perplexity import evaluate
from birdbone_core.guard import Verdict, stop_loss
from birdbone_core.loop.context import Context, finite_or_first_bad, save_overlay
from birdbone_core.loop.layout import WAVE_STEPS, WEIGHT_STEPS, read_json, write_json
from birdbone_core.model.layers import decoder_layers, linear_modules
from birdbone_core.progress import console
from birdbone_core.prune.sequential import count_zeros, prune_sequential
from birdbone_core.runtime import describe


def num(x) -> float | None:
    """JSON-safe number: None for missing or non-finite values."""
    return float(x) if x is not None and math.isfinite(float(x)) else None


def targets(recipe) -> list[float]:
    return recipe.waves.targets(recipe.prune.sparsity) if recipe.waves is not None else [recipe.prune.sparsity]


def wave_prune_cfg(p, target: float):
    """The prune section `p` for one wave: every sparsity scaled by target / final (overrides included)."""
    scale = target / p.sparsity if p.sparsity > 0 else 0.0
    return p.model_copy(update={"sparsity": target,
                                "layer_sparsity": {k: v * scale for k, v in p.layer_sparsity.items()}})


def heal_active(recipe) -> bool:
    return recipe.waves is not None and recipe.waves.heal.method != "none"


def regrow_cfg(recipe):
    """The recipe's regrowth section, when the recipe model has one (None: the regrow step is a no-op)."""
    return getattr(recipe.waves, "regrow", None) if recipe.waves is not None else None


def push_metrics(ctx: Context, step: str, wave: int | None, metrics: dict, seconds: float) -> None:
    """The team's metrics hook (birdbone_core.ops.metrics.push_step), when that module is installed."""
    try:
        from birdbone_core.ops.metrics import push_step
    except ImportError:
        return
    push_step(ctx.run.root, step, wave, {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, seconds)


def check_ready(ctx: Context, k: int, step: str) -> None:
    """Refuse a wave step whose inputs do not exist (exit 2, naming the step it needs)."""
    n = ctx.n_waves
    if not 1 <= k <= n:
        raise BirdboneError(f"{ctx.run.root}: no wave {k}; the recipe has waves 1..{n}")
    i = WAVE_STEPS.index(step)
    if i > 0:
        if read_json(ctx.lay.marker(k, WAVE_STEPS[i - 1])) is None:
            raise BirdboneError(f"{ctx.run.root}: wave {k} {step} needs step 'wave {k} {WAVE_STEPS[i - 1]}' first")
        return
    if k == 1:
        if read_json(ctx.lay.prepare_marker) is None:
            raise BirdboneError(f"{ctx.run.root}: wave 1 prune needs step 'prepare' first")
        return
    prev = read_json(ctx.lay.marker(k - 1, "decide"))
    if prev is None:
        raise BirdboneError(f"{ctx.run.root}: wave {k} prune needs step 'wave {k - 1} decide' first")
    if prev["action"] != "continue":
        raise BirdboneError(f"{ctx.run.root}: the loop ended at wave {k - 1} ({prev['action']}): no wave {k}")


def _done(ctx: Context, k: int, step: str) -> dict | None:
    return read_json(ctx.lay.marker(k, step))


def wave_prune(ctx: Context, k: int) -> dict | None:
    if _done(ctx, k, "prune") is not None:
        return None
    check_ready(ctx, k, "prune")
    t0 = time.perf_counter()
    recipe, target = ctx.recipe, targets(ctx.recipe)[k - 1]
    start = ctx.wave_start(k)
    model = ctx.load_into_working(start)
    cfg = ctx.prune_section()     # with the per-layer allocation prepare computed (OWL), if any
    cfg = cfg if recipe.waves is None else wave_prune_cfg(cfg, target)
    rep = prune_sequential(model, ctx.calibration()["blocks"], cfg,
                           description=f"wave {k}/{ctx.n_waves}: {recipe.prune.method} to {target:.0%}")
    zeros, total = count_zeros(model)
    rec = {"wave": k, "target": target, "sparsity": zeros / max(total, 1), "prune_seconds": rep.seconds,
           "layer_rel_error": [num(e) for e in rep.layer_rel_error], "runtime": describe(model)}
    if heal_active(recipe) or regrow_cfg(recipe) is not None:   # the loss healing has to win back
        chunks, ref_hidden = ctx.reference()
        res = evaluate(model, chunks, reference_hidden=ref_hidden, description=f"wave {k} pruned")[0]
        rec.update(ppl_pruned=num(res.ppl), kld_pruned=num(res.kld))
    rec["overlay"] = save_overlay(ctx.lay.overlay(k, "prune"), start, model)
    rec.update(weights="prune.safetensors", seconds=time.perf_counter() - t0)
    write_json(ctx.lay.marker(k, "prune"), rec)
    push_metrics(ctx, "prune", k, rec, rec["seconds"])
    return rec


def _heal_summary(rep) -> dict:
    d = rep.as_dict() if hasattr(rep, "as_dict") else {}
    if "layers" in d:   # blockwise: per layer loss before/after and the per-step curve
        d["loss_before"] = sum(x["loss_before"] for x in d["layers"]) / max(len(d["layers"]), 1)
        d["loss_after"] = sum(x["loss_after"] for x in d["layers"]) / max(len(d["layers"]), 1)
    return d


def wave_heal(ctx: Context, k: int) -> dict | None:
    if _done(ctx, k, "heal") is not None:
        return None
    check_ready(ctx, k, "heal")
    t0 = time.perf_counter()
    recipe = ctx.recipe
    if not heal_active(recipe):
        why = "one-shot recipe" if recipe.waves is None else "heal.method is none"
        rec = {"wave": k, "noop": True, "reason": why, "weights": None, "seconds": 0.0}
        write_json(ctx.lay.marker(k, "heal"), rec)
        return rec
    from birdbone_core.heal import distributed, heal, schedule

    distributed.init_distributed()   # under torchrun: FSDP2 healing (NCCL on CUDA, gloo on CPU); rank 0 writes
    cfg = recipe.waves.heal
    start = ctx.wave_start(k)
    model = ctx.load_into_working(ctx.state_after(k, "prune", start))
    blocks = ctx.calibration()["heal_blocks"]
    steps, lr = schedule(cfg, k, ctx.n_waves)
    desc = f"wave {k} healing ({cfg.method}, {steps} steps, lr {lr:.2g})"
    if cfg.method == "distill":   # the dense model's top-k logits were cached once by prepare
        from birdbone_core.heal.distill import heal_distill

        rep = heal_distill(model, ctx.base().model, blocks, cfg, steps=steps, lr=lr,
                           cache=ctx.teacher_cache(), description=desc)
    else:
        rep = heal(model, ctx.base().model, blocks, cfg, k, ctx.n_waves, description=desc)
    rec = {"wave": k, "method": cfg.method, "steps": steps, "lr": lr, "report": _heal_summary(rep),
           "processes": distributed.world_size(), "runtime": describe(model)}
    if not distributed.is_main():     # every rank holds the same gathered full weights; one writes them
        return rec
    rec["overlay"] = save_overlay(ctx.lay.overlay(k, "heal"), start, model)
    rec.update(weights="heal.safetensors", seconds=time.perf_counter() - t0)
    write_json(ctx.lay.marker(k, "heal"), rec)
    push_metrics(ctx, "heal", k, {"steps": steps, "lr": lr}, rec["seconds"])
    return rec


def wave_regrow(ctx: Context, k: int) -> dict | None:
    if _done(ctx, k, "regrow") is not None:
        return None
    check_ready(ctx, k, "regrow")
    cfg = regrow_cfg(ctx.recipe)
    if cfg is None:
        rec = {"wave": k, "noop": True, "reason": "the recipe has no regrowth", "weights": None, "seconds": 0.0}
        write_json(ctx.lay.marker(k, "regrow"), rec)
        return rec
    from birdbone_core.prune.regrow import regrow_model

    t0 = time.perf_counter()
    start = ctx.wave_start(k)
    model = ctx.load_into_working(ctx.state_after(k, "heal", start))
    zeros_before = count_zeros(model)[0]
    rep = regrow_model(model, ctx.base().model, ctx.calibration()["blocks"], cfg, nm=ctx.recipe.prune.nm,
                       description=f"wave {k} regrowth ({cfg.method})")
    if count_zeros(model)[0] != zeros_before:   # regrowth moves density, never changes it
        raise BirdboneError(f"wave {k} regrow changed the number of zeros ({zeros_before} -> "
                            f"{count_zeros(model)[0]}); nothing was saved")
    rec = {"wave": k, "method": cfg.method, "fraction": cfg.fraction, "swapped": rep["swapped"], "report": rep,
           "runtime": describe(model)}
    rec["overlay"] = save_overlay(ctx.lay.overlay(k, "regrow"), start, model)
    rec.update(weights="regrow.safetensors", seconds=time.perf_counter() - t0)
    write_json(ctx.lay.marker(k, "regrow"), rec)
    push_metrics(ctx, "regrow", k, {"swapped": rep["swapped"]}, rec["seconds"])
    return rec


def layer_sparsity(model) -> list[float]:
    """Zeros / elements over each decoder layer's linear weights, in layer order."""
    out = []
    for layer in decoder_layers(model):
        mods = linear_modules(layer).values()
        total = sum(m.weight.numel() for m in mods)
        out.append(sum(int((m.weight == 0).sum()) for m in mods) / max(total, 1))
    return out


def wave_evaluate(ctx: Context, k: int) -> dict | None:
    if _done(ctx, k, "evaluate") is not None:
        return None
    check_ready(ctx, k, "evaluate")
    t0 = time.perf_counter()
    model = ctx.load_into_working(ctx.state_after(k, "evaluate"))
    zeros, total = count_zeros(model)
    rec = {"wave": k, "sparsity": zeros / max(total, 1), "layer_sparsity": layer_sparsity(model),
           "runtime": describe(model)}
    bad = finite_or_first_bad(model)
    if bad is not None:
        rec.update(finite=False, nonfinite=bad, ppl=None, kld=None, top1=None)
    else:
        chunks, ref_hidden = ctx.reference()
        res = evaluate(model, chunks, reference_hidden=ref_hidden, description=f"wave {k} validation")[0]
        rec.update(finite=math.isfinite(res.ppl), ppl=num(res.ppl), kld=num(res.kld), top1=res.top1,
                   n_scored=res.n_scored)
        acc = accuracy(ctx, model)
        if acc is not None:
            rec["accuracy"] = acc
    rec["seconds"] = time.perf_counter() - t0
    write_json(ctx.lay.marker(k, "evaluate"), rec)
    push_metrics(ctx, "evaluate", k, rec, rec["seconds"])
    return rec


def accuracy(ctx: Context, model) -> dict | None:
    """Task accuracy and canaries the recipe's evaluation section asks for (None: it asks for none)."""
    ev = ctx.recipe.evaluation
    if not getattr(ev, "tasks", None) and not getattr(ev, "canaries", None):
        return None
    from birdbone_core.eval.tasks import accuracy_for

    return accuracy_for(model, ctx.base().tokenizer, ev)


def guard_accuracy(ctx: Context, k: int, strikes: int, measure):
    """(accuracy guardrail verdict, accuracy record) for wave k, or (None, None) when the recipe guards no
    task. measure() -> the accuracy record ({"accuracy": {task: value}, ...}, or None); it is called only
    when a task is guarded, so a caller can pass an evaluation that is costly to run."""
    base = (read_json(ctx.lay.prepare_marker) or {}).get("accuracy")
    if not (base and base.get("accuracy")):
        return None, None
    now = measure()
    if now is None:
        return None, None
    from birdbone_core.guard import accuracy_guard

    g = ctx.recipe.evaluation.accuracy_guard
    return accuracy_guard(k, now["accuracy"], base["accuracy"], strikes, g.threshold, g.patience), now


_VERDICT = {"accept": "accept", "continue": "strike", "rollback": "rollback"}


def _verdict(ctx: Context, k: int, ppl: float, prev: dict | None, accuracy_now: dict | None = None):
    """(combined Verdict, contract verdict, action, reason, accuracy verdict or None, perplexity strikes)
    for wave k with validation ppl `ppl` (and task accuracy, when the recipe guards it)."""
    recipe, n = ctx.recipe, ctx.n_waves
    acc_wave, acc_ppl, strikes = ((prev["accepted_wave"], prev["accepted_ppl"], prev["strikes"]) if prev
                                  else (0, ctx.base_ppl(), 0))
    if recipe.waves is None and math.isfinite(ppl):   # one-shot: no stop-loss (non-finite still rolls back)
        sl = Verdict("accept", f"wave {k}: one-shot {recipe.prune.method} {recipe.prune.pattern}, "
                               f"ppl {ppl:.3f}; accepted", k, ppl, 0)
    elif recipe.waves is None:
        sl = stop_loss(k, ppl, acc_wave, acc_ppl, strikes)
    else:
        s = recipe.waves.stop_loss
        sl = stop_loss(k, ppl, acc_wave, acc_ppl, strikes, s.threshold, s.patience)
    ppl_strikes, av = sl.strikes, None
    if recipe.waves is not None:
        av, _ = guard_accuracy(ctx, k, prev.get("accuracy_strikes", 0) if prev else 0, lambda: accuracy_now)
    if av is not None:
        from birdbone_core.guard import combine

        sl = combine(sl, av, acc_wave, acc_ppl)
    verdict, reason = _VERDICT[sl.action], sl.reason
    if sl.action == "rollback":
        action = "rollback"
    elif k < n:
        action = "continue"
    elif verdict == "accept":
        action = "finish"
    else:  # the last wave is a strike: the run ends at the last accepted state, not at a bad one
        action = "rollback"
        reason += f"; it is the last wave: rolling back to wave {sl.accepted_wave}"
    return sl, verdict, action, reason, av, ppl_strikes


def wave_decide(ctx: Context, k: int) -> dict | None:
    if _done(ctx, k, "decide") is not None:
        return None
    check_ready(ctx, k, "decide")
    t0 = time.perf_counter()
    pr, he, rg, ev = (_done(ctx, k, s) for s in ("prune", "heal", "regrow", "evaluate"))
    prev = _done(ctx, k - 1, "decide") if k > 1 else None
    ppl = ev["ppl"] if ev["finite"] and ev["ppl"] is not None else math.inf
    sl, verdict, action, reason, av, ppl_strikes = _verdict(ctx, k, ppl, prev, ev.get("accuracy"))
    prev_ppl = _done(ctx, k - 1, "evaluate")["ppl"] if k > 1 else ctx.base_ppl()
    ppl_pruned = pr.get("ppl_pruned", ev["ppl"])
    lost = (ppl_pruned - prev_ppl) if ppl_pruned is not None and prev_ppl is not None else None
    recovered = ((ppl_pruned - ev["ppl"]) / lost if lost and lost > 0 and ev["ppl"] is not None
                 and heal_active(ctx.recipe) else None)
    metrics = {"target": pr["target"], "sparsity": ev["sparsity"], "ppl_pruned": ppl_pruned, "ppl_healed": ev["ppl"],
               "kld": ev["kld"], "top1": ev["top1"], "healing_recovered": num(recovered),
               "finite": ev["finite"], "layer_sparsity": ev["layer_sparsity"],
               "prune_seconds": pr["prune_seconds"], "heal_seconds": he["seconds"],
               "regrow_swapped": rg.get("swapped"),
               "accuracy": (ev.get("accuracy") or {}).get("accuracy") or None,
               "failed_canaries": (ev.get("accuracy") or {}).get("failed_canaries") or None,
               "seconds": pr["seconds"] + he["seconds"] + rg["seconds"] + ev["seconds"]}
    if not he.get("noop"):
        metrics["heal"] = {key: he[key] for key in ("method", "steps", "lr")}
        metrics["heal"].update({key: v for key, v in he["report"].items()
                                if key in ("loss_before", "loss_after", "kl_before", "kl_after", "curve")})
        if "layers" in he["report"]:
            metrics["heal"]["layer_curves"] = [x["curve"] for x in he["report"]["layers"]]
    metrics = {key: v for key, v in metrics.items() if v is not None}
    start = ctx.wave_start(k, recorded_ok=True)
    entry = ctx.ledger.record_wave(k, start, ctx.state_after(k, "decide", start), metrics=metrics,
                                   decision=f"{verdict}: {reason}")
    console().print(reason)
    rec = {"wave": k, "action": action, "verdict": verdict, "reason": reason,
           "accepted_wave": sl.accepted_wave, "accepted_ppl": sl.accepted_ppl, "strikes": ppl_strikes,
           "ledger_wave": entry.wave, "stop_loss": sl.as_dict(),
           "accuracy_strikes": av.strikes if av is not None else 0,
           "accuracy_guard": av.as_dict() if av is not None else None,
           "metrics": {"ppl": ev["ppl"], "sparsity": ev["sparsity"], "kld": ev["kld"], "top1": ev["top1"],
                       "ppl_pruned": ppl_pruned, "healing_recovered": num(recovered)},
           "seconds": time.perf_counter() - t0}
    write_json(ctx.lay.marker(k, "decide"), rec)
    for s in WEIGHT_STEPS:   # the ledger now holds wave k exactly; the overlays are redundant
        p = ctx.lay.overlay(k, s)
        if p.exists():
            os.unlink(p)
    push_metrics(ctx, "decide", k, {"ppl": ev["ppl"] or math.inf, "sparsity": ev["sparsity"],
                                    "accepted_wave": sl.accepted_wave}, rec["seconds"])
    return rec


WAVE_FUNCS = {"prune": wave_prune, "heal": wave_heal, "regrow": wave_regrow, "evaluate": wave_evaluate,
              "decide": wave_decide}
