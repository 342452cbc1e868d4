"""`birdbone verify RUN`: check every file a later step would read from a run directory against what was
recorded when it was written, without loading a model: the manifest, the recipe's hash, the baseline's
outputs, the loop's caches and per-step weight overlays, and the ledger (entries against index.json,
delta files against their sha256). Each reader checks its own file too; this checks them all at once."""
from __future__ import annotations

from pathlib import Path

from birdbone_core import atomic
from birdbone_core.errors import BirdboneError
from birdbone_core.ledger import Ledger
from birdbone_core.ledger.delta import tensor_hash
from birdbone_core.loop.layout import WEIGHT_STEPS, Layout, read_json
from birdbone_core.model import checks
from birdbone_core.run import Run


def verify_run(root: Path) -> list[str]:
    """One line per verified item; raises BirdboneError naming the first file that does not match."""
    run, lay = Run(Path(root)), Layout(Path(root))
    m = run.manifest()
    lines = [f"{run.manifest_path.name}: readable"]
    run.recipe()                                     # refuses a recipe edited since `init`
    lines.append(f"{run.recipe_path.name}: sha256 {m['recipe_sha256'][:12]} as recorded")
    baseline = m["steps"].get("baseline")
    if baseline is not None:
        atomic.check_sha256(run.reference_path, baseline.get("reference_sha256"), "the baseline's outputs")
        lines.append(_line(run, run.reference_path, baseline.get("reference_sha256")))
    prep = read_json(lay.prepare_marker)
    if prep is not None:
        for path, key in ((lay.calibration_path, "calibration_sha256"), (lay.teacher_path, "teacher_sha256"),
                          (lay.allocation_path, "allocation_sha256")):
            if key in prep or path.is_file():
                atomic.check_sha256(path, prep.get(key), f"recorded by `prepare` in {lay.prepare_marker.name}")
                lines.append(_line(run, path, prep.get(key)))
    waves = sorted((int(d.name) for d in (lay.root / "waves").glob("*") if d.name.isdigit()), key=int) \
        if (lay.root / "waves").is_dir() else []
    for k in waves:
        if lay.marker(k, "decide").is_file():       # decided: the ledger holds the wave; its overlays are gone
            continue
        for step in WEIGHT_STEPS:
            rec = read_json(lay.marker(k, step))
            if rec and rec.get("weights"):
                path = lay.wave_dir(k) / rec["weights"]
                sha = (rec.get("overlay") or {}).get("sha256")
                atomic.check_sha256(path, sha, f"the weights of wave {k} {step}")
                if not path.is_file():
                    raise BirdboneError(f"{path}: missing, though step 'wave {k} {step}' recorded it")
                lines.append(_line(run, path, sha))
    ledger = Ledger(run.root)
    if ledger.exists():
        n = ledger.verify()
        lines.append(f"ledger: base and {n} wave(s), entries match index.json, delta files match their sha256")
        if (lay.base_dir / "config.json").is_file():
            lines.append(_check_base_copy(lay.base_dir, ledger))
    return lines


def _check_base_copy(base_dir: Path, ledger: Ledger) -> str:
    """The loop's base copy (RUN/base/) against the ledger's base hashes, one tensor at a time."""
    from safetensors import safe_open

    recorded = ledger.entry(0).tensors
    n = 0
    for file in checks.safetensors_files(base_dir):
        with safe_open(str(file), framework="pt") as fh:
            for name in fh.keys():
                if name in recorded:
                    if tensor_hash(fh.get_tensor(name)) != recorded[name].hash:
                        raise BirdboneError(f"{file}: tensor {name} differs from the base the ledger recorded "
                                            f"(damaged base copy)")
                    n += 1
    if n == 0:
        raise BirdboneError(f"{base_dir}: holds none of the tensors the ledger's base records")
    return f"{base_dir.name}/: {n} tensors match the ledger's base hashes"


def _line(run: Run, path: Path, sha: str | None) -> str:
    rel = path.relative_to(run.root)
    return f"{rel}: sha256 {sha[:12]} as recorded" if sha else f"{rel}: present (recorded without a hash)"
