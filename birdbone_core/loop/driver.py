"""The local driver: every remaining step of the adaptive loop in order, in one process (`birdbone run`,
alias `resume`), and the run's position in it (`birdbone status`).

The driver calls exactly the functions the per-step commands call, in the order `layout.plan` gives, so a
run killed at any point (even SIGKILL) and resumed ends with the same tensors as an uninterrupted one
(same thread count): every step restarts from what the run directory holds, never from process memory.
"""
from __future__ import annotations

import dataclasses
import time

from birdbone_core.errors import BirdboneError
from birdbone_core.loop import ends
from birdbone_core.loop.context import Context
from birdbone_core.loop.layout import plan, read_json
from birdbone_core.loop.wave import WAVE_FUNCS
from birdbone_core.model.load import LoadedModel
from birdbone_core.progress import console
from birdbone_core.steps import Run


def status(run: Run) -> dict:
    """{"waves": N, "done": [...], "next": "wave 3 heal" | None, "accepted_wave": k, "finished": bool}, and
    "gradual_rollback" (kept stage, each evaluated stage) after a gradual rollback."""
    ctx = Context(run)
    done, nxt, accepted, finished = plan(run.root, ctx.n_waves, run.manifest().get("steps", {}))
    s = {"waves": ctx.n_waves, "done": done, "next": nxt, "accepted_wave": accepted, "finished": finished}
    rb = read_json(ctx.lay.rollback_marker)
    if rb is not None and "gradual" in rb:     # a gradual rollback: which stage was kept, every stage's ppl
        g = rb["gradual"]
        s["gradual_rollback"] = {"kept_stage": g["kept_stage"], "stages": g["stages"], "ledger_wave": rb["ledger_wave"],
                                 "sparsity": rb["sparsity"], "ppl": rb["ppl"],
                                 "evaluated": [{k: r.get(k) for k in ("stage", "fraction_restored", "sparsity", "ppl",
                                                                      "kept")} for r in g["evaluated"]]}
    return s


def run_step(ctx: Context, sid: str):
    """Run one step by its id ("prepare", "wave 2 heal", "rollback", "finish", "export", "evaluate").
    Returns the step's record, or None when it had already completed."""
    from birdbone_core import steps

    parts = sid.split()
    if parts[0] == "wave":
        if len(parts) != 3 or parts[2] not in WAVE_FUNCS or not parts[1].isdigit():
            raise BirdboneError(f"unknown step {sid!r}")
        return WAVE_FUNCS[parts[2]](ctx, int(parts[1]))
    if sid == "prepare":
        return ends.prepare(ctx)
    if sid == "rollback":
        return ends.rollback(ctx)
    if sid == "finish":
        return ends.finish(ctx)
    if sid in ("export", "evaluate"):
        if ctx.run.done(sid):
            return None
        return steps.step_export(ctx.run) if sid == "export" else steps.step_evaluate(ctx.run)
    raise BirdboneError(f"unknown step {sid!r}")


def run_all(run: Run, source: LoadedModel | None = None, until: tuple[str, ...] = ()) -> Context:
    """Run every remaining step, stopping before any step in `until`. Returns the context."""
    ctx = Context(run, source)
    t0 = time.perf_counter()
    while True:
        _, nxt, _, _ = plan(run.root, ctx.n_waves, run.manifest().get("steps", {}))
        if nxt is None or nxt in until:
            break
        console().print(f"[bold]{nxt}[/bold]")
        run_step(ctx, nxt)
    console().print(f"loop steps done in {time.perf_counter() - t0:.0f}s")
    return ctx


def prune_in_waves(run: Run, source: LoadedModel) -> LoadedModel:
    """`birdbone prune` / `compress` with a waves recipe: the loop up to `finish`, in this process.
    Returns a LoadedModel holding the final weights (for export and evaluate in the same process)."""
    ctx = run_all(run, source, until=("export", "evaluate"))
    final = ctx.ledger_state(ctx.ledger.last_wave)
    if source is not None:   # callers (compress) keep using the model they passed: prune it in place
        source.model.load_state_dict(final, strict=True)
        return source
    return dataclasses.replace(ctx.base(), model=ctx.load_into_working(final))
