"""`birdbone` command line. Every step works on a run directory so it can run alone (e.g. as an Airflow
task in its own container); `compress` chains them in one process.

    birdbone compress [MODEL] -r recipe.yaml -o RUN      # all steps; MODEL defaults to Gemma 3 270M
    birdbone init RUN [--model MODEL] [-r recipe.yaml]   # then: baseline, prune, export, evaluate
    birdbone eval MODEL [--reference BASE]               # score any HF dir / GGUF / run dir
    birdbone log RUN | diff RUN A B | revert RUN --to W -o OUT   # the ledger of weight changes
    birdbone verify RUN                                           # every file against its recorded hash

User mistakes (bad files, bad recipes, unsupported models) print one line `error: ...` and exit 2.
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
from pathlib import Path

from birdbone_core import __version__
from birdbone_core.cliargs import add_runtime_flags, positive_int, runtime_of
from birdbone_core.errors import BirdboneError

# Subcommands that live beside their feature: each module defines add_commands(subparsers) and keeps its
# top-level imports light (the parser is built on every call). A module not present is not registered.
COMMAND_MODULES = (
    "birdbone_core.quant.cli",        # quantize / bit budget
    "birdbone_core.eval.tasks_cli",   # task accuracy (lm-eval), canaries
    "birdbone_core.report.cli",       # healing curves and run report
    "birdbone_core.ops.cli",          # DVC artifacts, Prometheus metrics
    "birdbone_core.loop.cli",         # the adaptive loop step by step: prepare, wave K STEP, ..., run, status
    "birdbone_core.structure.cli",    # structured pruning: vocabulary, whole layers, FFN neurons, KV groups
    "birdbone_core.eval.versus",      # a run's GGUF against llama.cpp's own quantizer at the same size
)


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def print_metrics_table(metrics: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    b, c = metrics["base"], metrics["compressed"]
    t = Table(title=escape(f"{metrics['recipe']}: {metrics['n_scored']} tokens of {metrics['eval_text']}, "
                           f"n_ctx={metrics['n_ctx']}"))
    for col in ("model", "file", "size MB", "zeros", "ppl (torch)", "ppl (llama.cpp)", "KLD vs base", "top-1 agree"):
        t.add_column(col, justify="right" if col not in ("model", "file") else "left")
    t.add_row("base", Path(b["path"]).name, _mb(b["bytes"]), "-", _f(b["ppl"], ".3f"),
              _f(b.get("ppl_llamacpp"), ".3f"), "0", "100%")
    t.add_row("compressed", Path(c["path"]).name if c["path"] else "-", _mb(c["bytes"]), f"{c['sparsity']:.1%}",
              _f(c["ppl"], ".3f"), _f(c["ppl_llamacpp"], ".3f"), _f(c["kld"], ".4f"),
              "-" if c["top1"] is None else f"{c['top1']:.1%}")
    Console(width=max(140, Console().width)).print(t)
    st = metrics.get("structure")
    if st:   # the base above is the cut model; what the cut itself did, against the model the run started from
        vocab = f", vocabulary {st['vocab']['of']:,} -> {st['vocab']['kept']:,} tokens" if st.get("vocab") else ""
        print(f"structure: {metrics['source']['path']} ({_mb(metrics['source']['bytes'])} MB) cut from "
              f"{st['params_before'] / 1e6:.1f}M to {st['params_after'] / 1e6:.1f}M parameters{vocab}; held-out "
              f"bits per byte {st['bits_per_byte_before']:.4f} -> {st['bits_per_byte_after']:.4f} (each with its "
              f"own tokenizer)")
    acc = metrics.get("accuracy")
    if acc:
        a = Table(title="task accuracy (lm-eval; +/- is the standard error)")
        for col in ("task", "items", "chance", "base", "compressed", "delta"):
            a.add_column(col, justify="left" if col == "task" else "right")
        for r in acc["deltas"]:
            a.add_row(r["task"], str(r["n"]), _f(r.get("chance"), ".0%"), f"{r['base']:.3f} ± {r['base_stderr']:.3f}",
                      f"{r['value']:.3f} ± {r['stderr']:.3f}", f"{r['delta']:+.3f} ± {r['delta_stderr']:.3f}")
        Console(width=max(140, Console().width)).print(a)
        for name in acc.get("failed_canaries") or []:
            print(f"canary failed: {name}")


def _cmd_compress(a) -> int:
    from birdbone_core.compress import compress
    from birdbone_core.run import Run

    metrics = compress(Path(a.out), a.model, a.recipe, _load_options(a), runtime_of(a))
    print_metrics_table(metrics)
    run = Run(Path(a.out))
    print(f"GGUF:    {metrics['compressed']['path']}")
    print(f"pruned:  {run.pruned_dir}  (transformers safetensors)")
    print(f"metrics: {run.metrics_path}")
    if metrics["compressed"]["ppl_llamacpp"] is None:
        print("(pip install 'birdbone-core[llamacpp]' to also score the GGUF in llama.cpp)")
    return 0


def _cmd_init(a) -> int:
    from birdbone_core.run_init import init_run

    targets = None
    if a.targets:
        try:
            targets = json.loads(a.targets)
        except json.JSONDecodeError as e:
            raise BirdboneError(f"--targets: not valid JSON ({e.msg})") from None
    run = init_run(Path(a.run), a.model, a.recipe, _load_options(a), targets=targets)
    print(f"run directory ready: {run.root}")
    return 0


def _cmd_step(a) -> int:
    from birdbone_core import steps

    run = steps.Run(Path(a.run), runtime_of(a))
    run.manifest()  # validates the directory
    if a.cmd == "baseline":   # alias of `prepare` (which scores the dense model first)
        from birdbone_core.loop.context import Context
        from birdbone_core.loop.ends import prepare

        prepare(Context(run))
        b = run.manifest()["steps"]["baseline"]
        print(f"baseline perplexity {b['ppl']:.3f} on {b['n_scored']} tokens")
    elif a.cmd == "prune":
        from birdbone_core.compress import prune

        prune(run)
        info = run.manifest()["steps"]["prune"]
        print(f"pruned to {info['sparsity']:.1%} zeros in {info['seconds']:.0f}s -> {run.pruned_dir}")
    elif a.cmd == "export":
        r = steps.step_export(run)
        print(f"wrote {r.path} ({_mb(r.n_bytes)} MB, {r.bits_per_weight:.2f} bits/weight)")
    elif a.cmd == "evaluate":
        print_metrics_table(steps.step_evaluate(run))
    return 0


def _ledger(a):
    from birdbone_core.ledger import Ledger
    from birdbone_core.steps import Run

    Run(Path(a.run)).manifest()
    ledger = Ledger(Path(a.run))
    if not ledger.exists():
        raise BirdboneError(f"{a.run}: this run has no ledger yet (run `birdbone prune` first)")
    return ledger


def _cmd_verify(a) -> int:
    from birdbone_core.verify import verify_run

    for line in verify_run(Path(a.run)):
        print(f"ok  {line}")
    print(f"{a.run}: every recorded file matches")
    return 0


def _cmd_log(a) -> int:
    from rich.console import Console

    from birdbone_core.ledger import format_log
    from birdbone_core.steps import Run
    from birdbone_core.structure.records import read_waves, structure_table

    console = Console(width=max(140, Console().width))
    if not (Path(a.run) / "run.json").is_file() and read_waves(Path(a.run)):   # a `birdbone structure` output
        console.print(structure_table(Path(a.run)))
        return 0
    ledger = _ledger(a)
    ledger.verify()              # a log of a damaged ledger would print what the files no longer hold
    cut = Run(Path(a.run)).structured_dir
    if read_waves(cut):          # the cut the ledger's base was made by
        console.print(structure_table(cut))
    console.print(format_log(ledger.log()))
    return 0


def _cmd_diff(a) -> int:
    from rich.console import Console

    from birdbone_core.ledger import format_diff

    ledger = _ledger(a)
    for w in (a.a, a.b):
        if not 0 <= w <= ledger.last_wave:
            raise BirdboneError(f"{a.run}: no wave {w}; the ledger holds waves 0..{ledger.last_wave}")
    Console(width=max(140, Console().width)).print(format_diff(ledger.diff(a.a, a.b), top=a.top))
    return 0


def _cmd_revert(a) -> int:
    from birdbone_core.steps import Run, revert

    if a.structure is not None:
        from birdbone_core import atomic
        from birdbone_core.structure.records import revert_structure

        src = Path(a.run)
        src = Run(src).structured_dir if (src / "run.json").is_file() else src
        atomic.check_output_dir(Path(a.out), "reverted model", not_within=src)
        out = revert_structure(src, a.structure, Path(a.out))
        print(f"wrote the exact model after structural wave {a.structure} to {out}")
        return 0
    out = revert(Run(Path(a.run)), a.to, Path(a.out))
    print(f"wrote the exact state after wave {a.to} to {out}")
    return 0


def _cmd_eval(a) -> int:
    from birdbone_core.data.text import evaluation_chunks, read_text
    from birdbone_core.eval.perplexity import check_n_ctx, evaluate
    from birdbone_core.run_init import load_with_options
    from birdbone_core.runtime import place

    spec, placement = a.model, place(runtime_of(a))
    own = (Path(spec) / "run.json").is_file()         # a run's pruned weights keep their stored dtype
    if own:
        spec = str(Path(spec) / "pruned")
    lm = load_with_options(spec, _load_options(a), placement, keep_dtype=own)
    check_n_ctx(lm.model, a.n_ctx)
    text, desc = read_text(a.text, "eval")
    chunks = evaluation_chunks(lm.tokenizer, text, a.n_ctx, a.max_chunks)
    ref_hidden = None
    if a.reference:
        ref = load_with_options(a.reference, _load_options(a), placement)
        if ref.tokenizer.get_vocab() != lm.tokenizer.get_vocab():
            raise BirdboneError(f"{a.reference}: reference model has a different vocabulary; KL needs the same one")
        _, ref_hidden = evaluate(ref.model, chunks, description="scoring reference")
        del ref
    result, _ = evaluate(lm.model, chunks, reference_hidden=ref_hidden, description="scoring model")
    if not all(math.isfinite(x) for x in (result.ppl, result.kld if result.kld is not None else 0.0)):
        raise BirdboneError(f"{a.model}: scoring gave ppl {result.ppl}, KLD {result.kld}: the model's outputs "
                            f"hold NaN/Inf; check its weights and config")
    out = {"model": a.model, "text": desc, **result.as_dict()}
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        line = f"{a.model}: ppl {result.ppl:.3f} over {result.n_scored} tokens of {desc} (n_ctx={result.n_ctx})"
        if result.kld is not None:
            line += f", KLD {result.kld:.4f}, top-1 agreement {result.top1:.1%}"
        print(line)
    return 0


def _load_options(a) -> dict:
    return {"allow_pickle": a.allow_pickle, "trust_remote_code": a.trust_remote_code, "online": a.online}


def _add_load_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model loading (all off by default)")
    g.add_argument("--allow-pickle", action="store_true", help="allow pickle checkpoints (.bin/.pt): they can run code")
    g.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code from its repo")
    g.add_argument("--online", action="store_true", help="allow downloading a hub id")


class _Parser(argparse.ArgumentParser):
    """argparse, with its complaint as the one `error:` line every other bad input gets (after the usage)."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="birdbone", description="Prune, heal and quantize causal LMs into GGUF.")
    p.add_argument("--version", action="version", version=f"birdbone {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("compress", help="run every step: baseline, prune, export, evaluate")
    c.add_argument("model", nargs="?", help="HF dir, .gguf file or hub id (default: built-in Gemma 3 270M)")
    c.add_argument("-r", "--recipe", help="YAML recipe (default: 50%% unstructured SparseGPT, Q8_0)")
    c.add_argument("-o", "--out", required=True, help="run directory to write")
    _add_load_flags(c)
    add_runtime_flags(c)
    c.set_defaults(fn=_cmd_compress)

    i = sub.add_parser("init", help="create a run directory")
    i.add_argument("run")
    i.add_argument("--model", help="HF dir, .gguf file or hub id (default: built-in Gemma 3 270M)")
    i.add_argument("-r", "--recipe")
    i.add_argument("--targets", metavar="JSON",
                   help='recipe overrides by dotted path, e.g. \'{"prune.sparsity": 0.4, "export.type": "f16"}\'')
    _add_load_flags(i)
    i.set_defaults(fn=_cmd_init)

    for name, help_ in (("baseline", "score the dense model, keep its outputs for KL"),
                        ("prune", "one-shot layer-by-layer pruning"),
                        ("export", "write the GGUF"),
                        ("evaluate", "score the compressed model against the baseline")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("run")
        add_runtime_flags(s)
        s.set_defaults(fn=_cmd_step)

    vf = sub.add_parser("verify", help="check every file of a run against the hashes recorded when written")
    vf.add_argument("run")
    vf.set_defaults(fn=_cmd_verify)
    lg = sub.add_parser("log", help="the run's ledger: one line per wave (and its structural waves, if any)")
    lg.add_argument("run")
    lg.set_defaults(fn=_cmd_log)
    d = sub.add_parser("diff", help="per-tensor changes and metrics between two waves")
    d.add_argument("run")
    d.add_argument("a", type=int)
    d.add_argument("b", type=int)
    d.add_argument("--top", type=int, default=20, help="show the N most-changed tensors")
    d.set_defaults(fn=_cmd_diff)
    rv = sub.add_parser("revert", help="write the exact weights after a wave (0 = base), or after a structural "
                                       "wave (--structure K; 0 = the uncut model)")
    rv.add_argument("run", help="run directory (or, with --structure, a `birdbone structure` output)")
    which = rv.add_mutually_exclusive_group(required=True)
    which.add_argument("--to", type=int, help="ledger wave (0: the run's base)")
    which.add_argument("--structure", type=int, metavar="K",
                       help="structural wave (0: the model before any cut), from the cut's wave records")
    rv.add_argument("-o", "--out", required=True, help="output directory (transformers safetensors)")
    rv.set_defaults(fn=_cmd_revert)

    e = sub.add_parser("eval", help="perplexity (and KL vs a reference) of any model")
    e.add_argument("model", help="HF dir, .gguf file, or run directory (its pruned model)")
    e.add_argument("--reference", help="uncompressed model for KL divergence and top-1 agreement")
    e.add_argument("--text", help="evaluation text (.txt/.jsonl[.gz]); default: built-in held-out slice")
    e.add_argument("--n-ctx", type=positive_int, default=512)
    e.add_argument("--max-chunks", type=positive_int, default=8)
    e.add_argument("--json", action="store_true", help="print JSON")
    _add_load_flags(e)
    add_runtime_flags(e)
    e.set_defaults(fn=_cmd_eval)

    import importlib
    import importlib.util

    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name.rsplit(".", 1)[0]) and importlib.util.find_spec(name):
            importlib.import_module(name).add_commands(sub)
    return p


# Commands that change the run directory they are given (or, verify, need it still): they hold its lock
# (birdbone_core.run.Run.locked), so two processes never work on one run at once; the second waits. (`compress` locks
# once its run exists.)
CHANGES_RUN = frozenset({"baseline", "prune", "export", "evaluate", "prepare", "wave", "rollback", "finish",
                         "run", "resume", "publish", "report", "verify"})


def _dispatch(args) -> int:
    if getattr(args, "device", None) is not None:    # --device cuda without CUDA: one error line, nothing done
        from birdbone_core.runtime import resolve_device

        resolve_device(args.device)
    # under torchrun (distributed healing) rank 0 holds the run's lock for every rank: only it writes
    first_rank = os.environ.get("RANK", "0") == "0"
    if args.cmd in CHANGES_RUN and getattr(args, "run", None) and first_rank:
        from birdbone_core.run import Run

        run = Run(Path(args.run))
        if run.manifest_path.is_file():                 # else the command says what is wrong with it
            with run.locked(args.cmd):
                return args.fn(args)
    return args.fn(args)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:               # --help, --version, or a usage error (already printed)
        return int(e.code or 0)
    try:
        return _dispatch(args)
    except BirdboneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not a user error: one line unless asked for the traceback
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):   # the machine's, not a bug
            where = f" writing {e.filename}" if e.filename else ""
            print(f"error: no space left on the device{where}; free some and run the step again (files are "
                  f"written under temporary names and renamed when complete: nothing half-written remains)",
                  file=sys.stderr)
            return 2
        if os.environ.get("BIRDBONE_DEBUG"):
            raise
        print(f"internal error: {type(e).__name__}: {e} (set BIRDBONE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
