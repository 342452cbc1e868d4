"""The parts of the run's steps (birdbone_core.steps, and `prepare` in birdbone_core.loop.ends) that work on
a model streamed layer by layer (birdbone_core.model.stream) instead of one held whole: used whenever the
model is a safetensors directory of a plain text causal LM and the step needs no whole-model work (task
accuracy, OWL allocation, distillation). Each gives the bytes the in-memory path gives."""
from __future__ import annotations

from pathlib import Path

import torch

from birdbone_core import atomic
from birdbone_core.data.text import calibration_blocks, read_text
from birdbone_core.ledger import Ledger
from birdbone_core.model.load import load_tokenizer
from birdbone_core.model.source import preflight, resolve_source
from birdbone_core.model.stream import ModelState, SafetensorsWriter, StreamedModel, write_config
from birdbone_core.progress import console
from birdbone_core.prune.streamed import prune_streamed
from birdbone_core.recipe import Recipe
from birdbone_core.report.prune_report import PruneReport, one_shot_report, write_prune_report
from birdbone_core.run import Run
from birdbone_core.runtime import Placement, describe


def open_base(run: Run) -> tuple[StreamedModel, object]:
    """The run's base model (RUN/structured/ or its source), checked as a load would check it, streamed on
    the run's placement; and its tokenizer."""
    spec = run.base_spec()
    preflight(resolve_source(spec), **{k: v for k, v in run.load_options().items() if k != "online"})
    console().print(f"streaming {spec} layer by layer")
    return StreamedModel.open(spec, run.placement()), load_tokenizer(spec)


def can_prepare(run: Run, recipe: Recipe, streamable_base: bool) -> bool:
    """Whether `prepare` can stream: a one-shot recipe whose evaluation asks for no tasks or canaries (those
    score the whole model) and whose pruning allocates uniformly (OWL reads every layer's statistics)."""
    ev = recipe.evaluation
    return (streamable_base and recipe.waves is None and not ev.tasks and not ev.canaries
            and getattr(recipe.prune, "allocation", "uniform") == "uniform")


def copy_base(sm: StreamedModel, tokenizer, out_dir: Path) -> None:
    """RUN/base/: the base model in the dtype the run computes in, written one tensor at a time (what
    save_hf writes of the loaded model: the same tensors, config and tokenizer)."""
    with atomic.staged_dir(out_dir) as tmp:
        writer = SafetensorsWriter(tmp / "model.safetensors", sm.write_order())
        try:
            for name, _, _ in sm.write_order():
                writer.write(name, sm.state[name])
        except BaseException:
            writer.abort()
            raise
        writer.close()
        write_config(tmp, sm.model, tokenizer)


def base_state(base_dir: Path) -> ModelState:
    """RUN/base/'s state, each tensor read when the ledger asks for it."""
    return StreamedModel.open(base_dir, Placement(torch.device("cpu")), keep_dtype=True,
                              materialize=False).checkpoint_state()


def prune(run: Run, recipe: Recipe) -> None:
    """step_prune, streamed: the same pruning, ledger wave and report, in memory bounded by a layer."""
    sm, tokenizer = open_base(run)
    cal = recipe.calibration
    text, text_desc = read_text(cal.text, "calib")
    blocks = calibration_blocks(tokenizer, text, cal.n_samples, cal.seq_len, cal.seed)
    ledger = Ledger(run.root)
    ledger.init_base(sm.checkpoint_state(), meta={"source": run.manifest()["model"]})
    report = prune_streamed(sm, blocks, recipe.prune, run.pruned_dir, tokenizer,
                            description=f"{recipe.prune.method} {recipe.prune.pattern}")
    rep = prune_record(run, recipe, report, text_desc, describe(sm.model), streamed=True)
    sm.release()                           # the ledger reads both states from disk, a tensor at a time
    ledger.record_wave(1, sm.checkpoint_state(), sm.checkpoint_state(run.pruned_dir),
                       metrics={"linear_sparsity": rep.sparsity}, decision=f"one-shot {report.method} {report.pattern}")
    finish_prune(run, rep)


def prune_record(run: Run, recipe: Recipe, report, text_desc: str, runtime: dict, streamed: bool) -> PruneReport:
    """The one-shot prune step's prune_report.json (report.prune_report: the loop's schema, one wave)."""
    base = run.manifest()["steps"].get("baseline")
    return one_shot_report(report, targets=[recipe.prune.sparsity], base_ppl=base["ppl"] if base else None,
                           calibration=recipe.calibration.record(text_desc), runtime=runtime, streamed=streamed)


def finish_prune(run: Run, rep: PruneReport) -> None:
    write_prune_report(run.root, rep)
    run.mark_done("prune", rep.summary())


def revert(run: Run, ledger: Ledger, wave: int, placement: Placement, out_dir: Path) -> None:
    """steps.revert one tensor at a time: the base read from its checkpoint, each tensor taken through the
    ledger's deltas up to `wave` (hash-checked) and written straight out (a marked output directory)."""
    spec = run.base_spec()
    console().print(f"rebuilding wave {wave} from {spec}, one tensor at a time")
    sm = StreamedModel.open(spec, placement, materialize=False)
    state = sm.checkpoint_state()
    order = [(n, sm.dtype, sm.state.shapes[n]) for n in state if n in sm.state]   # a tied head is stored once
    with atomic.staged_dir(out_dir, mark=True) as tmp:
        writer = SafetensorsWriter(tmp / "model.safetensors", order)
        try:
            for name, t in ledger.tensors_at(wave, state):
                if name in sm.state:
                    writer.write(name, t)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        write_config(tmp, sm.model, load_tokenizer(spec))
