"""Crash safety and concurrency, measured on the fixture model (outside the default test run: minutes).

1. Reference: `birdbone init` + `birdbone run` uninterrupted, a 2-wave SparseGPT recipe with healing.
2. Kill trials: the same run, SIGKILLed at a random moment (seeded), then `birdbone resume` to the end;
   the pruned weights, the GGUF's tensors and the ledger's wave digests must equal the reference's, and
   no temp file may be left behind.
3. Concurrency trials: two `birdbone run` processes started together on one run directory; both must
   exit 0, one must have waited for the other (the run lock), and the result must equal the reference.

    .venv/bin/python tests/reliability/kill_resume.py --trials 20 --concurrent 3 \\
        --out tests/benchmarks/results/reliability-kill-resume
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "tiny-llama"
RECIPE = """name: kill-resume
calibration: {n_samples: 8, seq_len: 64}
evaluation: {n_ctx: 64, max_chunks: 4}
prune: {method: sparsegpt, sparsity: 0.5}
export: {type: f16}
waves: {max_per_wave: 0.25, heal: {method: blockwise, steps: 5}, stop_loss: {threshold: 10.0, patience: 2}}
"""
ENV = {**os.environ, "BIRDBONE_PROGRESS": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def birdbone(*args) -> list[str]:
    return [sys.executable, "-m", "birdbone_core.cli", *map(str, args)]


def init(run: Path, recipe: Path) -> None:
    subprocess.run(birdbone("init", run, "--model", FIXTURE, "-r", recipe), env=ENV, check=True,
                   capture_output=True)


def fingerprint(run: Path) -> dict:
    """What must not depend on crashes or concurrency: weights, GGUF tensors, ledger waves."""
    import hashlib

    from gguf import GGUFReader
    from safetensors.torch import load_file

    pruned = load_file(str(run / "pruned" / "model.safetensors"))
    gguf = GGUFReader(run / "model-f16.gguf")
    index = json.loads((run / "ledger" / "index.json").read_text())
    return {
        "pruned": {k: hashlib.sha256(v.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy()
                                     .tobytes()).hexdigest() for k, v in sorted(pruned.items())},
        "gguf": {t.name: hashlib.sha256(t.data.tobytes()).hexdigest() for t in gguf.tensors},
        "ledger": [w["digest"] for w in index["waves"]],
    }


def debris(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".old"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--concurrent", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    work = Path(tempfile.mkdtemp(prefix="birdbone-kill-"))
    recipe = work / "recipe.yaml"
    recipe.write_text(RECIPE)
    try:
        ref = work / "reference"
        init(ref, recipe)
        t0 = time.perf_counter()
        subprocess.run(birdbone("run", ref), env=ENV, check=True, capture_output=True)
        ref_seconds = time.perf_counter() - t0
        want = fingerprint(ref)
        print(f"reference run: {ref_seconds:.1f} s", flush=True)

        kills = []
        for i in range(a.trials):
            run = work / f"kill-{i}"
            init(run, recipe)
            at = rng.uniform(0.5, 0.9 * ref_seconds)      # from start-up to the last steps
            p = subprocess.Popen(birdbone("run", run), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                p.wait(timeout=at)
                killed = False                       # it finished before the kill time
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait()
                killed = True
            done = json.loads((run / "run.json").read_text())["steps"]
            waves_done = sorted(str(m.relative_to(run)) for m in (run / "waves").rglob("*.json")) \
                if (run / "waves").is_dir() else []
            left = debris(run)
            r = subprocess.run(birdbone("resume", run), env=ENV, capture_output=True, text=True)
            same = r.returncode == 0 and fingerprint(run) == want
            trial = {"trial": i, "kill_at_s": round(at, 2), "killed": killed,
                     "steps_done_at_kill": sorted(done) + waves_done, "debris_at_kill": left,
                     "resume_exit": r.returncode, "identical": same, "debris_after": debris(run)}
            kills.append(trial)
            print(f"kill {i}: at {at:.1f} s ({len(trial['steps_done_at_kill'])} steps done, {len(left)} temp "
                  f"file(s)) -> resume exit {r.returncode}, identical {same}", flush=True)

        conc = []
        for i in range(a.concurrent):
            run = work / f"concurrent-{i}"
            init(run, recipe)
            ps = [subprocess.Popen(birdbone("run", run), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True) for _ in range(2)]
            outs = [p.communicate(timeout=600) for p in ps]
            waited = sum("is being worked on by PID" in err for _, err in outs)
            same = all(p.returncode == 0 for p in ps) and fingerprint(run) == want
            conc.append({"trial": i, "exits": [p.returncode for p in ps], "waited": waited, "identical": same})
            print(f"concurrent {i}: exits {[p.returncode for p in ps]}, {waited} waited, identical {same}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    killed = [k for k in kills if k["killed"]]
    summary = {
        "reference_seconds": round(ref_seconds, 1),
        "kill_trials": len(kills), "killed_mid_run": len(killed),
        "identical_after_resume": sum(k["identical"] for k in kills),
        "temp_files_at_kill": sum(len(k["debris_at_kill"]) for k in kills),
        "temp_files_after_resume": sum(len(k["debris_after"]) for k in kills),
        "concurrent_trials": len(conc), "concurrent_identical": sum(c["identical"] for c in conc),
        "concurrent_one_waited": sum(c["waited"] == 1 for c in conc),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps({"summary": summary, "kills": kills, "concurrent": conc},
                                                     indent=2) + "\n")
    lines = ["# Kill/resume and concurrency on the fixture model",
             "", f"Command: `.venv/bin/python tests/reliability/kill_resume.py --trials {a.trials} "
             f"--concurrent {a.concurrent} --seed {a.seed} --out {a.out}`", "",
             "| measure | value |", "|---|---|"]
    lines += [f"| {k.replace('_', ' ')} | {v} |" for k, v in summary.items()]
    lines += ["", "| trial | kill at (s) | steps done at kill | temp files at kill | resume exit | identical |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {k['trial']} | {k['kill_at_s']}{'' if k['killed'] else ' (finished first)'} | "
              f"{len(k['steps_done_at_kill'])} | {len(k['debris_at_kill'])} | {k['resume_exit']} | {k['identical']} |"
              for k in kills]
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    ok = summary["identical_after_resume"] == len(kills) and summary["concurrent_identical"] == len(conc) \
        and summary["temp_files_after_resume"] == 0
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
