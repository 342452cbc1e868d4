"""The steps around the waves: `prepare` before them, `rollback` and `finish` after the last decision.

    prepare   dense scores + reference hidden states (the `baseline` step), a safetensors copy of the base
              in RUN/base/, calibration and healing blocks (token ids), the teacher's top-k logits when
              healing distils, and the ledger's wave 0 (base hashes)
    rollback  record a revert to the last accepted wave in the ledger (append-only: a new ledger wave)
    finish    the ledger's final state -> RUN/pruned/ (transformers dir) + prune_report.json; after it the
              usual `export` and `evaluate` steps run as for a one-shot run
"""
from __future__ import annotations

import time

from safetensors.torch import save_file

from birdbone_core import atomic
from birdbone_core.data.text import calibration_blocks, read_text
from birdbone_core.errors import BirdboneError
from birdbone_core.loop.context import Context, finite_or_first_bad
from birdbone_core.loop.layout import read_json, write_json
from birdbone_core.loop.wave import push_metrics, targets
from birdbone_core.model.save import save_hf
from birdbone_core.progress import console
from birdbone_core.steps import step_baseline


def prepare(ctx: Context) -> dict | None:
    if read_json(ctx.lay.prepare_marker) is not None:
        return None
    t0 = time.perf_counter()
    run, lay, recipe = ctx.run, ctx.lay, ctx.recipe
    if not run.done("baseline"):
        step_baseline(run, ctx.load_source())
    if not (lay.base_dir / "config.json").is_file():
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
        tok = ctx.load_source().tokenizer
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
    ctx.ledger.init_base(ctx.base_state(), meta={"source": run.manifest()["model"]})
    ctx.source = None   # later steps use the base copy
    from birdbone_core.loop.wave import accuracy

    base_acc = accuracy(ctx, ctx.base().model)      # what the accuracy guardrail compares waves with
    rec = {"n_waves": ctx.n_waves, "targets": targets(recipe), "base_ppl": ctx.base_ppl(),
           "calibration": {"text": text_desc, "n_samples": cal.n_samples, "seq_len": cal.seq_len, "seed": cal.seed},
           "healing_data": {"n_samples": heal_cal.n_samples, "seq_len": heal_cal.seq_len, "seed": heal_cal.seed},
           "seconds": time.perf_counter() - t0}
    if base_acc is not None:
        rec["accuracy"] = base_acc
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
    to = d["accepted_wave"]
    entry = ctx.ledger.revert_marker(to, metrics={"ppl": d["accepted_ppl"]}, decision=f"rollback to wave {to}")
    console().print(f"rolled back to wave {to} (ledger wave {entry.wave}): {d['reason']}")
    rec = {"to_wave": to, "ledger_wave": entry.wave, "after_wave": d["wave"], "reason": d["reason"],
           "ppl": d["accepted_ppl"], "seconds": time.perf_counter() - t0}
    write_json(ctx.lay.rollback_marker, rec)
    push_metrics(ctx, "rollback", d["wave"], {"to_wave": to}, rec["seconds"])
    return rec


def summary(ctx: Context) -> dict:
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
        history.append({"wave": rb["ledger_wave"], "rollback_to": rb["to_wave"], "ppl": rb["ppl"]})
    zeros = ctx.ledger.entry(ctx.ledger.last_wave)
    return {"mode": "waves" if recipe.waves is not None else "one-shot", "method": recipe.prune.method,
            "pattern": recipe.prune.pattern, "targets": targets(recipe), "sparsity": None,
            "seconds": seconds, "base_ppl": prep["base_ppl"], "accepted_wave": accepted,
            "ledger_wave": zeros.wave, "waves": history, "calibration": prep["calibration"]}


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
    rep = summary(ctx)
    z, total = count_zeros(model)
    rep["sparsity"] = z / max(total, 1)
    atomic.write_json(run.root / "prune_report.json", rep)
    info = {k: rep[k] for k in ("mode", "method", "pattern", "sparsity", "seconds", "accepted_wave", "calibration")}
    run.mark_done("prune", info)      # what `export` and `evaluate` check for
    run.mark_done("finish", {"ledger_wave": rep["ledger_wave"], "accepted_wave": rep["accepted_wave"],
                             "sparsity": rep["sparsity"]})
    push_metrics(ctx, "finish", None, {"sparsity": rep["sparsity"], "accepted_wave": rep["accepted_wave"]},
                 time.perf_counter() - t0)
    return model
