"""`birdbone` subcommands of the adaptive loop (registered by birdbone_core.cli through add_commands):

    birdbone prepare RUN                 baseline scores, base copy, calibration cache, ledger wave 0
    birdbone wave RUN K {prune,heal,regrow,evaluate,decide}
    birdbone rollback RUN                restore the last accepted state (a revert wave in the ledger)
    birdbone finish RUN                  final weights -> RUN/pruned/
    birdbone run RUN  (alias: resume)    every remaining step, export and evaluate included
    birdbone status RUN [--json]

A step that already completed prints "already done" and exits 0; a step whose inputs are missing exits 2
with `error: ... needs step X first`.
"""
from __future__ import annotations

import json
from pathlib import Path

from birdbone_core.loop.layout import WAVE_STEPS


def _run(a):
    from birdbone_core.steps import Run

    run = Run(Path(a.run))
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
    rec = run_step(Context(_run(a)), sid)
    print(_describe(sid, rec))
    return 0


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
    p.set_defaults(fn=_cmd_one)
    w = sub.add_parser("wave", help="one step of pruning wave K")
    w.add_argument("run")
    w.add_argument("k", type=int, metavar="K")
    w.add_argument("step", choices=WAVE_STEPS)
    w.set_defaults(fn=_cmd_one)
    for name, help_ in (("rollback", "restore the last accepted state (recorded as a ledger wave)"),
                        ("finish", "write the final weights to RUN/pruned/")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("run")
        s.set_defaults(fn=_cmd_one)
    for name in ("run", "resume"):
        r = sub.add_parser(name, help="every remaining step in order, in this process (after a crash: resume)")
        r.add_argument("run")
        r.set_defaults(fn=_cmd_run)
    st = sub.add_parser("status", help="where the run stands: done steps, the next one, the accepted wave")
    st.add_argument("run")
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=_cmd_status)
