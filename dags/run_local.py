"""Run birdbone_compress once, locally, with Airflow's dag.test() (no scheduler, no server): every step
runs as a subprocess of the birdbone CLI, exactly as the Airflow tasks do. Then print where the GGUF, the
ledger and the report are.

    .venv-airflow/bin/python dags/run_local.py [--model M] [--recipe R] [--run-id ID] [--runs-root runs]

Airflow's state (SQLite) goes to RUNS_ROOT/.airflow unless AIRFLOW_HOME is set. (Listed in .airflowignore:
this file is a script, not a DAG.)
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def recipe_has_waves(path: Path) -> bool:
    """Whether a recipe prunes in waves (a `waves:` section); one without runs as a single wave."""
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return True                  # the init step reports a bad recipe; keep every slot meanwhile
    return not isinstance(doc, dict) or doc.get("waves") is not None


def size_targets(size: str) -> dict:
    """The DAG's `targets` param for --size: the recipe's quantize.target_size (birdbone init checks it)."""
    return {"quantize.target_size": size.strip()} if size.strip() else {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="", help="HF dir, .gguf or hub id (default: birdbone's built-in model)")
    p.add_argument("--recipe", default="", help="recipe YAML (default: birdbone's default recipe)")
    p.add_argument("--run-id", default="local", help="run directory name under --runs-root")
    p.add_argument("--runs-root", default=str(REPO / "runs"))
    p.add_argument("--cli", default=os.environ.get("BIRDBONE_CLI", str(REPO / ".venv" / "bin" / "birdbone")))
    p.add_argument("--size", default="",
                   help="quantize the GGUF to this file size (160MB, or a share of the source: 40%%) instead of "
                        "the recipe's export type: the recipe target quantize.target_size")
    p.add_argument("--versus", action="store_true",
                   help="then `birdbone versus`: the GGUF against llama.cpp's own quantizer at the same file size")
    a = p.parse_args(argv)
    runs_root = Path(a.runs_root).absolute()
    home = Path(os.environ.get("AIRFLOW_HOME", runs_root / ".airflow"))
    home.mkdir(parents=True, exist_ok=True)
    # Airflow reads its configuration at import: set it first
    os.environ.update({
        "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW_VAR_BIRDBONE_EXECUTOR": "local",
        "AIRFLOW_VAR_BIRDBONE_CLI": a.cli, "AIRFLOW_VAR_BIRDBONE_RUNS_ROOT": str(runs_root),
    })
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.recipe and "BIRDBONE_WAVE_SLOTS" not in os.environ and not recipe_has_waves(Path(a.recipe)):
        os.environ["BIRDBONE_WAVE_SLOTS"] = "1"     # a one-shot recipe runs as one wave: no slots to skip
    if not Path(a.cli).is_file():
        print(f"error: {a.cli}: birdbone CLI not found (make venv, or pass --cli)", file=sys.stderr)
        return 2
    subprocess.run([str(Path(sys.executable).with_name("airflow")), "db", "migrate"], check=True,
                   stdout=subprocess.DEVNULL)

    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    if bag.import_errors:
        print(f"error: DAG import errors: {bag.import_errors}", file=sys.stderr)
        return 1
    run = runs_root / a.run_id
    dr = bag.dags["birdbone_compress"].test(
        run_conf={"model": a.model, "recipe": str(Path(a.recipe).absolute()) if a.recipe else "",
                  "run_id": a.run_id, "targets": size_targets(a.size)})
    state = getattr(dr.state, "value", dr.state)
    print(f"birdbone_compress {dr.run_id}: {state}")
    if state != "success":
        return 1
    import json

    m = json.loads((run / "metrics.json").read_text())
    b, c = m["base"], m["compressed"]
    mb = lambda n: "-" if n is None else f"{n / 1e6:,.1f} MB"  # noqa: E731
    st = m.get("structure")
    if st:
        vocab = f", vocabulary {st['vocab']['of']:,} -> {st['vocab']['kept']:,} tokens" if st.get("vocab") else ""
        print(f"source:      {m['source']['path']}  {mb(m['source']['bytes'])}")
        print(f"structure:   {st['params_before'] / 1e6:.1f}M -> {st['params_after'] / 1e6:.1f}M parameters{vocab}; "
              f"held-out bits per byte {st['bits_per_byte_before']:.4f} -> {st['bits_per_byte_after']:.4f}")
    print(f"base:        {b['path']}  {mb(b['bytes'])}  ppl {b['ppl']:.3f}")
    print(f"compressed:  {c['gguf_type']}, {c['sparsity']:.1%} zeros, {mb(c['bytes'])}  ppl {c['ppl']:.3f}"
          + (f" (llama.cpp {c['ppl_llamacpp']:.3f})" if c.get("ppl_llamacpp") else "")
          + (f", KLD {c['kld']:.4f}, top-1 {c['top1']:.1%}" if c.get("kld") is not None else "")
          + f"  ({m['n_scored']} held-out tokens, n_ctx {m['n_ctx']})")
    ggufs = sorted(run.glob("model-*.gguf"))
    print(f"GGUF:    {', '.join(map(str, ggufs)) or '(none)'}")
    print(f"ledger:  {run / 'ledger'}   ({a.cli} log {run})")
    print(f"metrics: {run / 'metrics.json'}")
    print(f"report:  {run / 'report' / 'report.md'}")
    source_kind = json.loads((run / "run.json").read_text())["model"]["kind"]
    if a.versus and source_kind != "gguf":
        print(f"(no llama.cpp comparison: the run started from a {source_kind}, not a GGUF)")
    elif a.versus:
        print("\nllama.cpp's own quantizer at the same file size (birdbone versus):", flush=True)
        return subprocess.run([a.cli, "versus", str(run)]).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
