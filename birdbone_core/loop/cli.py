"""`birdbone` subcommands of the adaptive loop (registered by birdbone_core.cli through add_commands):

    birdbone prepare RUN                 baseline scores, base copy, calibration cache, ledger wave 0
    birdbone wave RUN K {prune,heal,regrow,evaluate,decide}
    birdbone rollback RUN                restore the last accepted state (a revert wave in the ledger)
    birdbone finish RUN                  final weights -> RUN/pruned/
    birdbone run RUN  (alias: resume)    every remaining step, export and evaluate included
    birdbone status RUN [--json]

A step that already completed prints "already done" and exits 0; a step whose inputs are missing exits 2
with `error: ... needs step X first`.

With env BIRDBONE_RESULT_JSON=PATH a step also writes its record there as JSON (a wave step that had
already completed writes the record it wrote then). Orchestrators read results from it instead of from
the run directory: Airflow's Kubernetes pods set it to /airflow/xcom/return.json, so `wave K decide`'s
decision reaches the stop-loss branch as an XCom.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from birdbone_core.cliargs import add_runtime_flags, runtime_of
from birdbone_core.loop.layout import WAVE_STEPS

ENV_RESULT_JSON = "BIRDBONE_RESULT_JSON"


def _run(a):
    from birdbone_core.steps import Run

    run = Run(Path(a.run), runtime_of(a))
    run.manifest()  # validates the directory
    return run


def _describe(sid: str, rec) -> str:
    if rec is None:
        return f"{sid}: already done"
    if not isinstance(rec, dict):
        return f"{sid}: done"
    if "action" in rec:
        return f"{sid}: {rec['action']} ({rec['reason']})"
    if rec.get("noop"):
        return f"{sid}: nothing to do ({rec['reason']})"
    bits = [f"{k} {rec[k]:.4g}" for k in ("sparsity", "ppl_pruned", "ppl", "kld") if isinstance(rec.get(k), float)]
    if "gradual" in rec:
        g = rec["gradual"]
        bits.append(f"gradual rollback toward wave {rec['to_wave']}: stage {g['kept_stage']}/{g['stages']} kept "
                    f"(ledger wave {rec['ledger_wave']})")
    elif "to_wave" in rec:
        bits.append(f"back to wave {rec['to_wave']} (ledger wave {rec['ledger_wave']})")
    if "seconds" in rec:
        bits.append(f"{rec['seconds']:.0f}s")
    return f"{sid}: done" + (" — " + ", ".join(bits) if bits else "")


def _cmd_one(a) -> int:
    from birdbone_core.loop.context import Context
    from birdbone_core.loop.driver import run_step

    sid = f"wave {a.k} {a.step}" if a.cmd == "wave" else a.cmd
    ctx = Context(_run(a))
    rec = run_step(ctx, sid)
    print(_describe(sid, rec))
    write_result(ctx, a, sid, rec)
    return 0


def write_result(ctx, a, sid: str, rec) -> None:
    """The step's record to $BIRDBONE_RESULT_JSON (nothing when unset). A wave step that was already done
    returns no record: its marker file holds the one it wrote, so a retried `decide` reports the same
    decision."""
    target = os.environ.get(ENV_RESULT_JSON)
    if not target:
        return
    from birdbone_core import atomic

    if rec is None and a.cmd == "wave" and ctx.lay.marker(a.k, a.step).is_file():
        rec = json.loads(ctx.lay.marker(a.k, a.step).read_text())
    out = rec if isinstance(rec, dict) else {"step": sid, "already_done": rec is None}
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(Path(target), out)


def _cmd_run(a) -> int:
    from birdbone_core.loop.driver import run_all, status

    run = _run(a)
    run_all(run)
    s = status(run)
    m = json.loads(run.metrics_path.read_text()) if run.metrics_path.is_file() else None
    print(f"finished: accepted wave {s['accepted_wave']} of {s['waves']}")
    if m is not None:
        from birdbone_core.cli import print_metrics_table

        print_metrics_table(m)
    return 0


def _cmd_status(a) -> int:
    from birdbone_core.loop.driver import status

    s = status(_run(a))
    if a.json:
        print(json.dumps(s))
    else:
        print(f"waves: {s['waves']}; done: {len(s['done'])} steps; next: {s['next'] or '-'}; "
              f"accepted wave: {s['accepted_wave'] if s['accepted_wave'] is not None else '-'}; "
              f"finished: {'yes' if s['finished'] else 'no'}")
        g = s.get("gradual_rollback")
        if g is not None:
            stages = ", ".join(f"{r['stage']}: ppl {r['ppl']:.4g} at {r['sparsity']:.1%}" if r.get("ppl") is not None
                               else f"{r['stage']}: non-finite" for r in g["evaluated"])
            print(f"gradual rollback: stage {g['kept_stage']}/{g['stages']} kept (ledger wave {g['ledger_wave']}, "
                  f"sparsity {g['sparsity']:.1%}); stages {stages}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("prepare", help="dense scores, base copy, calibration cache, ledger wave 0")
    p.add_argument("run")
    add_runtime_flags(p)
    p.set_defaults(fn=_cmd_one)
    w = sub.add_parser("wave", help="one step of pruning wave K")
    w.add_argument("run")
    w.add_argument("k", type=int, metavar="K")
    w.add_argument("step", choices=WAVE_STEPS)
    add_runtime_flags(w)
    w.set_defaults(fn=_cmd_one)
    for name, help_ in (("rollback", "restore the last accepted state (recorded as a ledger wave)"),
                        ("finish", "write the final weights to RUN/pruned/")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("run")
        add_runtime_flags(s)
        s.set_defaults(fn=_cmd_one)
    for name in ("run", "resume"):
        r = sub.add_parser(name, help="every remaining step in order, in this process (after a crash: resume)")
        r.add_argument("run")
        add_runtime_flags(r)
        r.set_defaults(fn=_cmd_run)
    st = sub.add_parser("status", help="where the run stands: done steps, the next one, the accepted wave")
    st.add_argument("run")
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=_cmd_status)
