"""Fuzz recipes and model files (outside the default test run). Each case mutates a valid recipe or a copy
of the fixture model at random (seeded), runs `birdbone init` (and, for a model that init accepts,
`birdbone eval`) in this process, and sorts the outcome:

- accepted: exit 0 (the mutation left a valid input; the run directory is then discarded);
- refused:  exit 2, exactly one `error:` line, nothing written;
- defect:   anything else (internal error, traceback, several lines, a partial output, a hang).

    .venv/bin/python tests/reliability/fuzz.py --recipes 600 --models 120 \\
        --out tests/benchmarks/results/reliability-fuzz
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import random
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "tiny-llama"
BASE_RECIPE = {
    "name": "fuzz",
    "calibration": {"n_samples": 8, "seq_len": 64, "seed": 0},
    "evaluation": {"n_ctx": 64, "max_chunks": 2},
    "prune": {"method": "sparsegpt", "sparsity": 0.5, "pattern": "unstructured", "batch_size": 4,
              "sparsegpt": {"blocksize": 64, "percdamp": 0.01}, "layer_sparsity": {"mlp": 0.4}},
    "export": {"type": "f16"},
    "waves": {"max_per_wave": 0.25, "heal": {"method": "blockwise", "steps": 5, "lr": 1e-4},
              "stop_loss": {"threshold": 0.05, "patience": 2}},
    "quantize": {"target_bpw": 4.5, "types": ["Q4_0", "Q8_0"], "gptq": {"block_size": 64}},
}
POOL = [-1, 0, 1, 2, 7, 0.5, 1.0, 1.5, -0.5, 2 ** 63, -2 ** 63, 1e308, float("nan"), float("inf"), "", "x" * 300,
        None, [], {}, True, False, "1:2:3", "2:4", "../../etc/passwd", "\u202e\u0000", "Q4_K", "sparsegpt", [1, "a"],
        {"method": "owl"}, "(", 100_000, 131_073]
SECONDS = 120


class Hang(Exception):
    pass


def run(*args) -> tuple[int, str]:
    from birdbone_core.cli import main

    out, err = io.StringIO(), io.StringIO()

    def alarm(*_):
        raise Hang()

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(SECONDS)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
    except Hang:
        return -1, "hang"
    except BaseException as e:  # an escape from main is itself a defect
        return -2, f"{type(e).__name__}: {e}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return code, err.getvalue()


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def classify(code: int, err: str, changed: bool) -> str:
    if code == 0:
        return "accepted"
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    if code == 2 and len(lines) == 1 and "Traceback" not in err and not changed:
        return "refused"
    return "defect"


# ---- recipes ---------------------------------------------------------------------------------------
def _paths(d, prefix=()):
    for k, v in d.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from _paths(v, prefix + (k,))


def mutate_recipe(rng: random.Random) -> str:
    r = copy.deepcopy(BASE_RECIPE)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(list(_paths(r)))
        parent = r
        for k in path[:-1]:
            parent = parent[k]
        op = rng.random()
        if op < 0.6:
            parent[path[-1]] = copy.deepcopy(rng.choice(POOL))
        elif op < 0.75:
            parent.pop(path[-1], None)
        else:
            parent[rng.choice(["bogus", "sparsty", "n_sample", path[-1] + "_"])] = rng.choice(POOL)
    text = yaml.safe_dump(r, sort_keys=False, allow_unicode=True)
    op = rng.random()
    if op < 0.15:                                     # byte-level damage
        b = bytearray(text.encode())
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return b.decode("utf-8", "surrogateescape")
    if op < 0.2:
        return text[: rng.randrange(len(text))]
    if op < 0.25:
        key = rng.choice(list(r))
        return text + yaml.safe_dump({key: r.get(key)})   # a duplicate top-level key
    return text


# ---- models ----------------------------------------------------------------------------------------
def mutate_model(rng: random.Random, d: Path) -> str:
    op = rng.choice(["config-value", "config-delete", "config-bytes", "header-bytes", "data-bytes",
                     "tokenizer-bytes", "remove-file", "truncate"])
    if op.startswith("config") and op != "config-bytes":
        cfg = json.loads((d / "config.json").read_text())
        key = rng.choice(list(cfg))
        value = copy.deepcopy(rng.choice(POOL))
        if op == "config-value":
            cfg[key] = value
        else:
            cfg.pop(key)
        (d / "config.json").write_text(json.dumps(cfg))
        return f"{op} {key}" + (f" = {value!r:.40}" if op == "config-value" else "")
    target = {"config-bytes": "config.json", "header-bytes": "model.safetensors", "data-bytes": "model.safetensors",
              "tokenizer-bytes": "tokenizer.json", "remove-file": rng.choice(sorted(p.name for p in d.iterdir())),
              "truncate": "model.safetensors"}[op]
    p = d / target
    if op == "remove-file":
        p.unlink()
        return f"{op} {target}"
    b = bytearray(p.read_bytes())
    if op == "truncate":
        p.write_bytes(bytes(b[: rng.randrange(len(b))]))
        return op
    lo, hi = 0, len(b)
    if op in ("header-bytes", "data-bytes"):
        hlen = 8 + int.from_bytes(b[:8], "little")
        lo, hi = (0, hlen) if op == "header-bytes" else (hlen, len(b))
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(lo, hi)
        b[i] ^= 1 << rng.randrange(8)
    p.write_bytes(bytes(b))
    return f"{op} {target}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", type=int, default=600)
    ap.add_argument("--models", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    os.environ.update(BIRDBONE_PROGRESS="0", HF_HUB_OFFLINE="1")
    import torch

    torch.set_num_threads(1)
    rng = random.Random(a.seed)
    work = Path(tempfile.mkdtemp(prefix="birdbone-fuzz-"))
    results = {"recipes": {"accepted": 0, "refused": 0, "defect": 0},
               "models": {"accepted": 0, "refused": 0, "defect": 0}, "defects": []}
    try:
        for i in range(a.recipes):
            case = work / f"r{i}"
            case.mkdir()
            (case / "r.yaml").write_bytes(mutate_recipe(rng).encode("utf-8", "surrogateescape"))
            before = files(case)
            code, err = run("init", case / "run", "--model", FIXTURE, "-r", case / "r.yaml")
            kind = classify(code, err, code != 0 and files(case) != before)
            results["recipes"][kind] += 1
            if kind == "defect":
                results["defects"].append({"case": f"recipe {i}", "exit": code, "stderr": err[-500:],
                                           "recipe": (case / "r.yaml").read_text(errors="replace")[:2000]})
            shutil.rmtree(case)
        for i in range(a.models):
            case = work / f"m{i}"
            shutil.copytree(FIXTURE, case / "model")
            (case / "r.yaml").write_text(yaml.safe_dump({k: BASE_RECIPE[k] for k in ("name", "calibration",
                                                                                     "evaluation", "prune")}))
            what = mutate_model(rng, case / "model")
            for args in (("init", case / "run", "--model", case / "model", "-r", case / "r.yaml"),
                         ("eval", case / "model", "--n-ctx", "64", "--max-chunks", "1")):
                before = files(case)
                code, err = run(*args)
                kind = classify(code, err, code != 0 and files(case) != before)
                if kind == "defect":
                    results["defects"].append({"case": f"model {i}: {what}", "command": args[0], "exit": code,
                                               "stderr": err[-500:]})
                if kind != "accepted":
                    break                    # refused (or a defect) at init: eval is not asked
            results["models"][kind] += 1     # accepted = both init and eval took it
            shutil.rmtree(case)
            print(f"model {i}: {what}: {kind}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    r, m = results["recipes"], results["models"]
    md = ["# Fuzzing recipes and model files", "",
          f"Command: `.venv/bin/python tests/reliability/fuzz.py --recipes {a.recipes} --models {a.models} "
          f"--seed {a.seed} --out {a.out}`", "",
          "| input | cases | accepted (valid after mutation) | refused (one error line, nothing written) | defects |",
          "|---|---|---|---|---|",
          f"| recipes (`init`) | {sum(r.values())} | {r['accepted']} | {r['refused']} | {r['defect']} |",
          f"| model files (`init`, then `eval` when init accepts) | {sum(m.values())} | {m['accepted']} | {m['refused']} | {m['defect']} |"]
    for d in results["defects"][:20]:
        md += ["", f"- defect: {d['case']} (exit {d['exit']}): `{d['stderr'].strip()[:300]}`"]
    a.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "defects"}), f"{len(results['defects'])} defect(s)")
    return 0 if not results["defects"] else 1


if __name__ == "__main__":
    sys.exit(main())
