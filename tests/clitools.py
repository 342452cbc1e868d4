"""Running `birdbone` in tests: as a real process (run_cli) or in this process (cli, which spares the
~5-10 s of importing torch and transformers per call), and the checks every bad-input case shares."""
import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import torch

from birdbone_core.cli import main


def run_cli(*args, cwd=None):
    env = {**os.environ, "BIRDBONE_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "birdbone_core.cli", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def cli(*args) -> subprocess.CompletedProcess:
    """`birdbone ARGS` in this process, on one torch thread; returns what run_cli returns."""
    out, err = io.StringIO(), io.StringIO()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
    finally:
        torch.set_num_threads(n)
    return subprocess.CompletedProcess(["birdbone", *map(str, args)], code, out.getvalue(), err.getvalue())


def assert_clean_failure(r, *needles):
    """Exit 2, no traceback, exactly one `error:` line, which holds every needle."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def tree(root: Path) -> dict:
    """Every file's bytes, but the run lock's holder line (rewritten by each command that takes it)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()
            and p.name != ".lock"}


# Runs ARGV as its child, from a process of its own: Linux starts a process's ru_maxrss at the RSS of the
# process it was forked from, so a child forked by a big pytest or benchmark process would report at least
# that. This launcher is a few MB; the command it forks reports its own peak.
_LAUNCH = ("import json, os, subprocess, sys\n"
           "with open(sys.argv[1], 'w') as log:\n"
           "    p = subprocess.Popen(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT)\n"
           "    _, status, usage = os.wait4(p.pid, 0)\n"
           "print(json.dumps([os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024]))")


def run_measured(argv: list[str], log: Path, env: dict | None = None) -> tuple[int, int, float]:
    """(exit code, peak RSS in bytes, wall seconds) of `argv`, its output in `log`."""
    import json
    import time

    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _LAUNCH, str(log), *map(str, argv)], capture_output=True, text=True,
                       env=env)
    if r.returncode != 0:
        raise RuntimeError(f"launcher failed: {r.stderr}")
    code, peak = json.loads(r.stdout.strip().splitlines()[-1])
    return code, peak, time.perf_counter() - t0
