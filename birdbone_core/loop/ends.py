"""The steps around the waves: `prepare` before them, `rollback` and `finish` after the last decision.

    prepare   dense scores + reference hidden states (the `baseline` step), a safetensors copy of the base
              in RUN/base/, calibration and healing blocks (token ids), the teacher's top-k logits when
              healing distils, and the ledger's wave 0 (base hashes)
    rollback  record a revert to the last accepted wave in the ledger (append-only: a new ledger wave);
              with waves.stop_loss.gradual, a gradual rollback (below)
    finish    the ledger's final state -> RUN/pruned/ (transformers dir) + prune_report.json; after it the
              usual `export` and `evaluate` steps run as for a one-shot run

Gradual rollback (waves.stop_loss.gradual: true, `stages` S, default 3). The rejected state R is the
ledger's last wave (the wave that decided rollback), A the last accepted state. The positions the rejected
waves zeroed (R == 0, A != 0) are restored to A's values in S equal parts, largest |w| in A first, per
tensor (loop/gradual.py; the calibration input norms are not kept after pruning, so the rank is |w| alone).
After each stage 1..S-1 the validation perplexity is measured with `wave K evaluate`'s evaluator and
chunks; the first stage within the stop-loss threshold of A's perplexity (guard.stop_loss's rule, and the
accuracy guardrail's when the recipe has tasks) is kept, so the run keeps as much of the extra sparsity
as the threshold allows. When none is, stage S is kept: A's exact bytes, recorded as a plain revert.
The kept state is one new ledger wave (kind "gradual", or "revert" for stage S) whose metrics hold
every evaluated stage (fraction restored, ppl, sparsity, kept); rollback.json repeats them. Kill-safe: a
ledger wave found after the deciding wave's is this rollback's record, and the marker is rebuilt from it
without evaluating again.
"""
from __future__ import annotations

import math
import time

from safetensors.torch import save_file

from birdbone_core import atomic, stream_steps
from birdbone_core.data.text import calibration_blocks, read_text
from birdbone_core.errors import BirdboneError
from birdbone_core.loop import gradual
from birdbone_core.loop.context import Context, finite_or_first_bad
from birdbone_core.loop.layout import read_json, write_json
from birdbone_core.loop.wave import num, push_metrics, targets
from birdbone_core.model.load import load_tokenizer
from birdbone_core.model.save import save_hf
from birdbone_core.model.stream import streamable
from birdbone_core.progress import console
from birdbone_core.report.prune_report import PruneReport, write_prune_report
from birdbone_core.run_init import ensure_structured
from birdbone_core.runtime import describe
from birdbone_core.steps import step_baseline


def prepare(ctx: Context) -> dict | None:
    if read_json(ctx.lay.prepare_marker) is not None:
        return None
    if ctx.run.done("prune"):            # pruned by the one-shot `prune` step (the loop's own marks `finish`)
        raise BirdboneError(f"{ctx.run.root}: already pruned in one shot (`birdbone prune` or `compress`); the "
                            f"step loop prunes a run itself: start it in a new run directory")
    t0 = time.perf_counter()
    run, lay, recipe = ctx.run, ctx.lay, ctx.recipe
    ensure_structured(run, ctx.placement)
    streamed = stream_steps.can_prepare(run, recipe, streamable(run.base_spec()))   # one layer at a time
    if not run.done("baseline"):
        step_baseline(run, None if streamed else ctx.load_source())
    if not (lay.base_dir / "config.json").is_file():
        if streamed:
            stream_steps.copy_base(*stream_steps.open_base(run), lay.base_dir)
        else:
            src = ctx.load_source()
            save_hf(src.model, src.tokenizer, lay.base_dir)
    cal = recipe.calibration
    text, text_desc = read_text(cal.text, "calib")
    heal_cal = cal
    if recipe.waves is not None:
        from birdbone_core.heal import healing_data

        heal_cal = healing_data(recipe.waves.heal, cal)
    if not lay.calibration_path.is_file():
        # the tokenizer the evaluation chunks were cut with (the run's model source)
        tok = load_tokenizer(run.base_spec()) if streamed else ctx.load_source().tokenizer
        blocks = calibration_blocks(tok, text, cal.n_samples, cal.seq_len, cal.seed)
        heal_blocks = (blocks.clone() if heal_cal == cal else
                       calibration_blocks(tok, text, heal_cal.n_samples, heal_cal.seq_len, heal_cal.seed))
        with atomic.staged_file(lay.calibration_path) as tmp:
            save_file({"blocks": blocks.contiguous(), "heal_blocks": heal_blocks.contiguous()}, str(tmp))
    if recipe.waves is not None and recipe.waves.heal.method == "distill" and not lay.teacher_path.is_file():
        from birdbone_core.heal.distill import teacher_topk

        h = recipe.waves.heal
        c = teacher_topk(ctx.base().model, ctx.calibration()["heal_blocks"], h.top_k, h.batch_size,
                         description="teacher top-k logits")
        with atomic.staged_file(lay.teacher_path) as tmp:
            save_file({"values": c.values, "indices": c.indices, "lse": c.lse}, str(tmp))
    if getattr(recipe.prune, "allocation", "uniform") != "uniform" and not lay.allocation_path.is_file():
        from birdbone_core.prune.owl import allocate

        # once, on the dense model, for the final target; each wave scales the map by its own target
        cfg = allocate(recipe.prune, ctx.base().model, ctx.calibration()["blocks"])
        write_json(lay.allocation_path, {"allocation": str(recipe.prune.allocation),
                                         "layer_sparsity": cfg.layer_sparsity})
    ctx.ledger.init_base(stream_steps.base_state(lay.base_dir) if streamed else ctx.base_state(),
                         meta={"source": run.manifest()["model"]})
    ctx.source = None   # later steps use the base copy
    from birdbone_core.loop.wave import accuracy

    # what the accuracy guardrail compares waves with (a streamed prepare has no tasks to score)
    base_acc = None if streamed else accuracy(ctx, ctx.base().model)
    rec = {"n_waves": ctx.n_waves, "targets": targets(recipe), "base_ppl": ctx.base_ppl(),
           "calibration": cal.record(text_desc), "healing_data": heal_cal.record(),
           "runtime": run.manifest()["steps"]["baseline"]["runtime"] if streamed else describe(ctx.base().model),
           "seconds": time.perf_counter() - t0}
    if base_acc is not None:
        rec["accuracy"] = base_acc
    rec["calibration_sha256"] = atomic.sha256_file(lay.calibration_path)
    for key, path in (("teacher_sha256", lay.teacher_path), ("allocation_sha256", lay.allocation_path)):
        if path.is_file():
            rec[key] = atomic.sha256_file(path)
    write_json(lay.prepare_marker, rec)
    push_metrics(ctx, "prepare", None, {"base_ppl": rec["base_ppl"], "n_waves": rec["n_waves"]}, rec["seconds"])
    return rec


def last_decision(ctx: Context) -> dict | None:
    """The decision that ended the loop (action rollback or finish), or None while it is still running."""
    for k in range(1, ctx.n_waves + 1):
        d = read_json(ctx.lay.marker(k, "decide"))
        if d is None:
            return None
        if d["action"] != "continue":
            return d
    return None


def rollback(ctx: Context) -> dict | None:
    if read_json(ctx.lay.rollback_marker) is not None:
        return None
    d = last_decision(ctx)
    if d is None:
        raise BirdboneError(f"{ctx.run.root}: rollback needs the waves' last step ('wave K decide') first")
    if d["action"] != "rollback":
        raise BirdboneError(f"{ctx.run.root}: wave {d['wave']} decided '{d['action']}', not rollback; nothing to roll back")
    t0 = time.perf_counter()
    sl = ctx.recipe.waves.stop_loss if ctx.recipe.waves is not None else None
    if sl is not None and sl.gradual:
        return _gradual_rollback(ctx, d, sl, t0)
    to = d["accepted_wave"]
    entry = ctx.ledger.revert_marker(to, metrics={"ppl": d["accepted_ppl"]}, decision=f"rollback to wave {to}")
    console().print(f"rolled back to wave {to} (ledger wave {entry.wave}): {d['reason']}")
    rec = {"to_wave": to, "ledger_wave": entry.wave, "after_wave": d["wave"], "reason": d["reason"],
           "ppl": d["accepted_ppl"], "seconds": time.perf_counter() - t0}
    write_json(ctx.lay.rollback_marker, rec)
    push_metrics(ctx, "rollback", d["wave"], {"to_wave": to}, rec["seconds"])
    return rec


def _gradual_rollback(ctx: Context, d: dict, sl, t0: float) -> dict:
    """`rollback` with stop_loss.gradual (see the module docstring)."""
    to, after, ledger = d["accepted_wave"], d["ledger_wave"], ctx.ledger
    last = ledger.last_wave
    if last == after + 1:   # killed after the ledger append and before the marker: that entry is ours
        entry = ledger.entry(last)
        g = entry.metrics.get("gradual_rollback")
        if not isinstance(g, dict) or g.get("after_ledger_wave") != after or g.get("to_wave") != to:
            raise BirdboneError(f"{ctx.run.root}: ledger wave {last} follows wave {d['wave']}'s decision but is "
                                f"not its gradual rollback (was the run changed by another command?)")
    elif last != after:
        raise BirdboneError(f"{ctx.run.root}: rollback starts from ledger wave {after} (wave {d['wave']}'s "
                            f"decision), but the ledger's last wave is {last}")
    else:
        entry = _record_gradual(ctx, d, sl)
        g = entry.metrics["gradual_rollback"]
    kept = g["kept_stage"]
    console().print(f"gradual rollback toward wave {to} (ledger wave {entry.wave}): kept stage {kept}/"
                    f"{g['stages']}, sparsity {entry.metrics['sparsity']:.4g}: {d['reason']}")
    rec = {"to_wave": to, "ledger_wave": entry.wave, "after_wave": d["wave"], "reason": d["reason"],
           "ppl": entry.metrics["ppl"], "sparsity": entry.metrics["sparsity"], "gradual": g,
           "seconds": time.perf_counter() - t0}
    write_json(ctx.lay.rollback_marker, rec)
    push_metrics(ctx, "rollback", d["wave"], {"to_wave": to, "kept_stage": kept}, rec["seconds"])
    return rec


def _stage_within(ctx: Context, d: dict, sl, model, row: dict) -> bool:
    """Measure one stage's state (the working `model`) into `row`; True when it is within the stop-loss."""
    from birdbone_core.eval.perplexity import evaluate
    from birdbone_core.guard import stop_loss
    from birdbone_core.loop.wave import accuracy, guard_accuracy

    bad = finite_or_first_bad(model)
    if bad is not None:
        row.update(finite=False, nonfinite=bad, ppl=None)
        return False
    chunks, ref_hidden = ctx.reference()     # wave K evaluate's evaluator and chunks
    res = evaluate(model, chunks, reference_hidden=ref_hidden,
                   description=f"rollback stage {row['stage']}/{sl.stages}")[0]
    row.update(finite=math.isfinite(res.ppl), ppl=num(res.ppl), kld=num(res.kld), top1=res.top1)
    v = stop_loss(d["wave"], res.ppl, d["accepted_wave"], d["accepted_ppl"], 0, sl.threshold, sl.patience)
    row["rise"] = num(res.ppl / d["accepted_ppl"] - 1.0)      # vs the accepted ppl; kept when <= threshold
    if v.action != "accept":
        return False
    # the accuracy guardrail holds for a kept stage too
    av, acc = guard_accuracy(ctx, d["wave"], 0, lambda: accuracy(ctx, model))
    if av is None:
        return True
    row.update(accuracy=acc["accuracy"], accuracy_reason=av.reason)
    return av.action == "accept"


def _record_gradual(ctx: Context, d: dict, sl):
    """Evaluate stages 1..S-1 in order, record the first within the threshold (else A) as a ledger wave."""
    from birdbone_core.prune.sequential import count_zeros

    to, after, n = d["accepted_wave"], d["ledger_wave"], sl.stages
    current, accepted = ctx.ledger_state(after), ctx.ledger_state(to)
    # rank by the accepted |w| alone: the calibration input norms are not stored after pruning
    masks = gradual.plan_states(current, accepted, n)
    counts = gradual.restored_counts(masks) or [0] * n
    total = counts[-1]
    rows, kept, state = [], None, None
    for s in range(1, n):
        if counts[s - 1] == (counts[s - 2] if s > 1 else 0):
            continue                      # this part restores nothing new: the same state as the last one
        state = gradual.state_at_stage(current, accepted, masks, s)
        model = ctx.load_into_working(state)
        z, t = count_zeros(model)
        row = {"stage": s, "restored": counts[s - 1], "fraction_restored": counts[s - 1] / total,
               "sparsity": z / max(t, 1), "measured": True}
        within = _stage_within(ctx, d, sl, model, row)
        row["kept"] = within
        rows.append(row)
        if within:
            kept = s
            break
    if kept is None:                     # stage S: the accepted state itself, its ppl as measured then
        z, t = count_zeros(ctx.load_into_working(accepted))
        kept = n
        rows.append({"stage": n, "restored": total, "fraction_restored": 1.0, "sparsity": z / max(t, 1),
                     "measured": False, "ppl": d["accepted_ppl"], "exact": True, "kept": True})
    k = rows[-1]
    g = {"after_ledger_wave": after, "to_wave": to, "stages": n, "kept_stage": kept, "threshold": sl.threshold,
         "accepted_ppl": d["accepted_ppl"], "restorable": total, "ranking": "accepted |w|", "evaluated": rows}
    metrics = {"ppl": k["ppl"], "sparsity": k["sparsity"], "gradual_rollback": g}
    if kept == n:
        why = (f"no earlier stage within {sl.threshold:+.0%} of its ppl {d['accepted_ppl']:.4g}" if len(rows) > 1
               else "the rejected waves zeroed nothing to restore in parts")
        return ctx.ledger.revert_marker(to, metrics=metrics, decision=(
            f"gradual rollback: stage {n}/{n}, wave {to} restored exactly ({why})"))
    return ctx.ledger.record_wave(after + 1, current, state, metrics, kind="gradual", decision=(
        f"gradual rollback: stage {kept}/{n} toward wave {to} ({k['restored']:,} of {total:,} zeroed "
        f"weights restored; ppl {k['ppl']:.4g} within {sl.threshold:+.0%} of {d['accepted_ppl']:.4g})"))


def summary(ctx: Context) -> PruneReport:
    """prune_report.json for a run through the loop: every wave's metrics and verdict, and the rollback."""
    recipe = ctx.recipe
    prep = read_json(ctx.lay.prepare_marker)
    history, seconds, accepted = [], prep["seconds"], 0
    for k in range(1, ctx.n_waves + 1):
        d = read_json(ctx.lay.marker(k, "decide"))
        if d is None:
            break
        entry = ctx.ledger.entry(d["ledger_wave"])
        history.append({"wave": k, **entry.metrics, "verdict": d["stop_loss"], "action": d["action"]})
        seconds += entry.metrics.get("seconds", 0.0) + d["seconds"]
        accepted = d["accepted_wave"]
        if d["action"] != "continue":
            break
    rb = read_json(ctx.lay.rollback_marker)
    if rb is not None:
        history.append({"wave": rb["ledger_wave"], "rollback_to": rb["to_wave"], "ppl": rb["ppl"],
                        **({"gradual": rb["gradual"]} if "gradual" in rb else {})})
    zeros = ctx.ledger.entry(ctx.ledger.last_wave)
    return PruneReport(mode="waves" if recipe.waves is not None else "one-shot", method=recipe.prune.method,
                       pattern=recipe.prune.pattern, targets=targets(recipe), sparsity=None, seconds=seconds,
                       base_ppl=prep["base_ppl"], accepted_wave=accepted, ledger_wave=zeros.wave, waves=history,
                       calibration=prep["calibration"])


def finish(ctx: Context):
    """Write the final state; returns the working model holding it (None when already done)."""
    run = ctx.run
    if run.done("finish"):
        return None
    d = last_decision(ctx)
    if d is None:
        raise BirdboneError(f"{run.root}: finish needs the waves' last step ('wave K decide') first")
    if d["action"] == "rollback" and read_json(ctx.lay.rollback_marker) is None:
        raise BirdboneError(f"{run.root}: finish needs step 'rollback' first (wave {d['wave']} decided rollback)")
    t0 = time.perf_counter()
    from birdbone_core.prune.sequential import count_zeros

    model = ctx.load_into_working(ctx.ledger_state(ctx.ledger.last_wave))
    bad = finite_or_first_bad(model)
    if bad is not None:
        raise BirdboneError(f"{run.root}: the final state has NaN/Inf in {bad}; nothing was saved")
    save_hf(model, ctx.base().tokenizer, run.pruned_dir)
    z, total = count_zeros(model)
    rep = summary(ctx).model_copy(update={"sparsity": z / max(total, 1), "runtime": describe(model)})
    write_prune_report(run.root, rep)
    run.mark_done("prune", rep.summary())      # what `export` and `evaluate` check for
    run.mark_done("finish", {"ledger_wave": rep.ledger_wave, "accepted_wave": rep.accepted_wave,
                             "sparsity": rep.sparsity, "runtime": rep.runtime})
    push_metrics(ctx, "finish", None, {"sparsity": rep.sparsity, "accepted_wave": rep.accepted_wave},
                 time.perf_counter() - t0)
    return model
