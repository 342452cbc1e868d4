"""A run's beginning: `init_run` creates the run directory (recipe and model checked before any work), and
the loaders every step uses: the run's model with its load options, on its placement, cut first by the
recipe's `structure:` section when it has one (`ensure_structured`).
"""
from __future__ import annotations

import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from birdbone_core import __version__, atomic
from birdbone_core.data.text import calibration_blocks, read_text
from birdbone_core.errors import BirdboneError
from birdbone_core.eval.perplexity import check_context, check_n_ctx
from birdbone_core.model.gguf_header import gguf_context_length
from birdbone_core.model.load import LoadedModel, load_model
from birdbone_core.model.source import preflight, resolve_source, skeleton
from birdbone_core.progress import console
from birdbone_core.prune.sequential import check_pattern
from birdbone_core.recipe import dump_recipe, load_recipe
from birdbone_core.run import Run
from birdbone_core.runtime import Placement, describe


def versions() -> dict[str, str]:
    import gguf
    import transformers

    return {"birdbone": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "gguf": getattr(gguf, "__version__", "?"), "python": platform.python_version()}


def init_run(root: Path, model_spec: str | None, recipe_file: str | None,
             load_options: dict | None = None, targets: dict | None = None) -> Run:
    """Create RUN/run.json and RUN/recipe.yaml. Re-running with the same model and recipe is a no-op;
    a different one is refused, so a run directory always describes one experiment. `targets` overrides
    recipe fields by dotted path (recipe.apply_targets) before validation."""
    from birdbone_core.model.default import default_model_path

    recipe = load_recipe(recipe_file, targets)
    for field, path in (("calibration.text", recipe.calibration.text), ("evaluation.text", recipe.evaluation.text),
                        ("quantize.imatrix", recipe.quantize.imatrix if recipe.quantize else None)):
        if path is not None and not Path(path).is_file():           # before any work, not at the step that reads it
            raise BirdboneError(f"{recipe_file}: {field}: {path} is not a file")
    spec = str(default_model_path()) if model_spec is None else model_spec
    opts = {k: bool(v) for k, v in (load_options or {}).items() if k in LOAD_OPTIONS}
    source = resolve_source(spec, offline=not opts.get("online", False))
    preflight(source, allow_pickle=opts.get("allow_pickle", False),
              trust_remote_code=opts.get("trust_remote_code", False))
    if (arch := skeleton(source)) is not None:      # the recipe against the architecture, before any work
        check_n_ctx(arch, recipe.evaluation.n_ctx)
        check_pattern(arch, recipe.prune)
    elif source.kind == "gguf":
        check_context(recipe.evaluation.n_ctx, gguf_context_length(Path(source.path)))
    run = Run(Path(root))
    model = {"spec": model_spec or "default", "kind": source.kind, "path": source.path, "options": opts}
    if run.manifest_path.exists():
        m = run.manifest()
        if m["recipe_sha256"] != recipe.sha256() or m["model"]["path"] != source.path:
            raise BirdboneError(
                f"{run.root}: run directory already holds a different model or recipe; use a new directory"
            )
        return run
    if run.root.exists() or run.root.is_symlink():
        if not run.root.is_dir():
            raise BirdboneError(f"{run.root}: exists and is not a directory; choose a new or empty run directory")
        if any(run.root.iterdir()):
            raise BirdboneError(f"{run.root}: exists, is not empty and is not a birdbone run; "
                                f"choose a new or empty run directory")
    try:
        run.root.mkdir(parents=True, exist_ok=True)
    except (NotADirectoryError, FileExistsError, PermissionError) as exc:
        raise BirdboneError(f"{run.root}: cannot create the run directory ({exc.strerror})") from exc
    atomic.write_text(run.recipe_path, dump_recipe(recipe))
    atomic.write_json(run.manifest_path, {
        "birdbone_run": 1, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model, "recipe_name": recipe.name, "recipe_sha256": recipe.sha256(),
        "versions": versions(), "steps": {},
    })
    return run


LOAD_OPTIONS = ("allow_pickle", "trust_remote_code", "online")


def load_with_options(spec: str, options: dict | None = None, placement: Placement | None = None,
                      keep_dtype: bool = False) -> LoadedModel:
    """load_model with a run's load options; placement: device and dtype (None: float32 on the CPU);
    keep_dtype: `spec` is a run's own weights (RUN/base, RUN/pruned), which keep their stored dtype."""
    o = options or {}
    return load_model(spec, allow_pickle=o.get("allow_pickle", False),
                      trust_remote_code=o.get("trust_remote_code", False), offline=not o.get("online", False),
                      placement=placement, keep_dtype=keep_dtype)


def load_step_model(spec: str, what: str, options: dict | None = None, placement: Placement | None = None,
          keep_dtype: bool = False) -> LoadedModel:
    console().print(f"loading {what}: {spec}")
    t0 = time.perf_counter()
    lm = load_with_options(spec, options, placement, keep_dtype)
    rt = describe(lm.model)
    console().print(f"loaded {lm.model_type} ({sum(p.numel() for p in lm.model.parameters()) / 1e6:.1f}M params) "
                    f"on {rt['device']} in {rt['dtype']} in {time.perf_counter() - t0:.0f}s")
    return lm


def load_model_for(run: Run, placement: Placement | None = None) -> LoadedModel:
    """The run's base model with its recorded load options, on `placement` (the run's when None): the model
    it started from, or, with a recipe `structure:` section, the cut model (made first when missing)."""
    ensure_structured(run, placement)
    return load_step_model(run.base_spec(), "base model", run.load_options(), placement or run.placement())


def ensure_structured(run: Run, placement: Placement | None = None) -> None:
    """With a recipe `structure:` section: cut the source model once (birdbone_core.structure.apply) into
    RUN/structured/ (HF dir, tokenizer.gguf for a GGUF source, structure.json with the held-out bits per
    byte before and after, each model with its own tokenizer). Every later step starts from it."""
    recipe = run.recipe()
    cfg = recipe.structure
    if cfg is None or run.done("structure"):
        return
    from birdbone_core.structure.apply import apply_structure, records_staging, save_structured

    t0 = time.perf_counter()
    cal, ev = recipe.calibration, recipe.evaluation
    text, text_desc = read_text(cal.text, "calib")
    held = read_text(ev.text, "eval")                              # (text, description)
    corpus = read_text(cfg.vocab_corpus, "calib") if cfg.vocab is not None else None
    lm = load_step_model(run.model_spec(), "source model", run.load_options(), placement or run.placement())
    blocks = calibration_blocks(lm.tokenizer, text, cal.n_samples, cal.seq_len, cal.seed)
    m = run.manifest()["model"]
    with records_staging(run.structured_dir) as records:
        cut = apply_structure(lm.model, lm.tokenizer, cfg, blocks, corpus=corpus, held=held, records=records,
                              source_gguf=Path(m["path"]) if m["kind"] == "gguf" else None)
        record = {"source": run.model_spec(), "calibration": text_desc, **cut.record}
        save_structured(lm.model, cut, run.structured_dir, record, records=records)
    bpb = record["held_out"]
    summary = {k: record[k] for k in ("params_before", "params_after")}
    if "vocab" in record:
        summary["vocab"] = {k: record["vocab"][k] for k in ("kept", "of", "corpus_tokenizes_identically")}
    run.mark_done("structure", {**summary, "bits_per_byte_before": bpb["bits_per_byte_before"],
                                "bits_per_byte_after": bpb["bits_per_byte_after"],
                                "seconds": time.perf_counter() - t0})
    console().print(f"structure: {record['params_before'] / 1e6:.1f}M -> {record['params_after'] / 1e6:.1f}M "
                    f"parameters; held-out bits per byte {bpb['bits_per_byte_before']:.4f} -> "
                    f"{bpb['bits_per_byte_after']:.4f}")
