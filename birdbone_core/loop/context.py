"""What every loop step needs from the run directory: the base model, the data, the current weights.

A step run in its own process builds a fresh `Context`; the local driver (`birdbone run`) keeps one
for all steps, so the base model is loaded once. Either way every step rebuilds its input weights from
the run directory (base + ledger deltas + the wave's overlay file), so a step computes the same thing
whether it runs alone, in the driver, or again after a crash.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from birdbone_core import atomic
from birdbone_core.errors import BirdboneError
from birdbone_core.ledger import Ledger, state_of
from birdbone_core.loop.layout import WEIGHT_STEPS, Layout, read_json
from birdbone_core.model.load import LoadedModel
from birdbone_core.model.source import ModelSource, stored_dtype
from birdbone_core.progress import console
from birdbone_core.run import Run
from birdbone_core.run_init import ensure_structured, load_with_options
from birdbone_core.runtime import Placement


class Context:
    def __init__(self, run: Run, source: LoadedModel | None = None):
        self.run = run
        self.lay = Layout(run.root)
        self.ledger = Ledger(run.root)
        self.source = source          # the model as loaded from the run's model spec (prepare only)
        self._base: LoadedModel | None = None
        self._base_state: dict[str, torch.Tensor] | None = None
        self._work = None
        self._recipe = None
        self._reference = None
        self._calibration = None
        self._placement: Placement | None = None

    @property
    def placement(self) -> Placement:
        """Where this process's steps compute (run.placement: the command line > the recipe > auto)."""
        if self._placement is None:
            self._placement = self.run.placement()
        return self._placement

    # ---- recipe and data ----------------------------------------------------------------------------
    @property
    def recipe(self):
        if self._recipe is None:
            self._recipe = self.run.recipe()
        return self._recipe

    @property
    def n_waves(self) -> int:
        r = self.recipe
        return 1 if r.waves is None else len(r.waves.targets(r.prune.sparsity))

    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(evaluation chunks [n_chunks, n_ctx], the dense model's scored hidden states)."""
        if self._reference is None:
            self.run.require("baseline", "the adaptive loop")
            ref = self.run.reference()
            self._reference = (ref["chunks"], ref["hidden"])
        return self._reference

    def calibration(self) -> dict[str, torch.Tensor]:
        """{"blocks": [n, seq_len], "heal_blocks": [n', seq_len']} token ids cached by prepare."""
        if self._calibration is None:
            atomic.check_sha256(self.lay.calibration_path, (read_json(self.lay.prepare_marker) or {}).get(
                "calibration_sha256"), "the calibration token cache, from `prepare`")
            self._calibration = load_file(str(self.lay.calibration_path))
        return self._calibration

    def teacher_cache(self):
        from birdbone_core.heal.distill import TeacherCache

        if not self.lay.teacher_path.is_file():
            return None
        atomic.check_sha256(self.lay.teacher_path, (read_json(self.lay.prepare_marker) or {}).get("teacher_sha256"),
                            "the teacher's top-k logits, from `prepare`")
        t = load_file(str(self.lay.teacher_path))
        return TeacherCache(values=t["values"], indices=t["indices"], lse=t["lse"])

    def prune_section(self):
        """The recipe's prune section with the per-layer map `prepare` allocated (OWL), if any."""
        if self.lay.allocation_path.is_file():
            atomic.check_sha256(self.lay.allocation_path, (read_json(self.lay.prepare_marker) or {}).get(
                "allocation_sha256"), "the per-layer sparsity map, from `prepare`")
        alloc = read_json(self.lay.allocation_path)
        p = self.recipe.prune
        return p if alloc is None else p.model_copy(update={"layer_sparsity": alloc["layer_sparsity"]})

    def base_ppl(self) -> float:
        return float(self.run.manifest()["steps"]["baseline"]["ppl"])

    # ---- models -------------------------------------------------------------------------------------
    def load_source(self) -> LoadedModel:
        if self.source is None:
            ensure_structured(self.run, self.placement)       # a recipe `structure:` section: cut first
            console().print(f"loading base model: {self.run.base_spec()}")
            self.source = load_with_options(self.run.base_spec(), self.run.load_options(), self.placement)
        return self.source

    def base(self) -> LoadedModel:
        """The base model from RUN/base/ (never modified: it is also the dense teacher), on this process's
        device, in the dtype prepare wrote it in: the ledger's hashes are of those exact tensors."""
        if self._base is None:
            if not (self.lay.base_dir / "config.json").is_file():
                raise BirdboneError(f"{self.run.root}: no base copy (RUN/base/); needs step 'prepare' first")
            stored = stored_dtype(ModelSource("hf_dir", str(self.lay.base_dir)))
            wanted = self.placement.dtype_for(stored, keep=True)
            if stored is not None and wanted != stored:
                raise BirdboneError(f"{self.run.root}: the run's weights are {str(stored)[6:]} (written by "
                                    f"prepare); dtype {str(wanted)[6:]} would not match the ledger: leave "
                                    f"--dtype / runtime.dtype at auto for the steps after prepare")
            t0 = time.perf_counter()
            self._base = load_with_options(str(self.lay.base_dir), None, self.placement, keep_dtype=True)
            console().print(f"loaded base copy in {time.perf_counter() - t0:.0f}s")
        return self._base

    def base_state(self) -> dict[str, torch.Tensor]:
        if self._base_state is None:
            # views of the base model's own tensors: nothing writes to the base (the working model is
            # a separate copy, and the ledger copies a tensor before applying a delta to it)
            self._base_state = state_of(self.base().model)
        return self._base_state

    def working(self):
        """A second copy of the base model that steps load states into and change in place."""
        if self._work is None:
            self._work = copy.deepcopy(self.base().model)
        return self._work

    # ---- weights ------------------------------------------------------------------------------------
    def ledger_state(self, wave: int) -> dict[str, torch.Tensor]:
        """The exact, hash-checked state after ledger wave `wave`."""
        return self.ledger.state_at(wave, self.base_state())

    def wave_start(self, k: int, recorded_ok: bool = False) -> dict[str, torch.Tensor]:
        """The state wave k starts from: the ledger's state after wave k-1 (k-1 must be its last; with
        recorded_ok, k may be too: `decide` killed after recording wave k and before its marker)."""
        last = self.ledger.last_wave
        if last != k - 1 and not (recorded_ok and last == k):
            raise BirdboneError(f"{self.run.root}: wave {k} starts from ledger wave {k - 1}, but the ledger's "
                                f"last wave is {last} (was the run pruned by another command?)")
        return self.ledger_state(k - 1)

    def state_after(self, k: int, step: str, start: dict | None = None) -> dict[str, torch.Tensor]:
        """Wave k's start state (`start`, when the caller has it) with the overlay of the last
        weight-changing step up to `step` applied."""
        state = dict(self.wave_start(k) if start is None else start)
        upto = WEIGHT_STEPS[: WEIGHT_STEPS.index(step) + 1] if step in WEIGHT_STEPS else WEIGHT_STEPS
        for s in reversed(upto):
            rec = read_json(self.lay.marker(k, s))
            if rec is None:
                raise BirdboneError(f"{self.run.root}: needs step 'wave {k} {s}' first")
            if rec.get("weights"):
                path = self.lay.wave_dir(k) / rec["weights"]
                if not path.is_file():
                    raise BirdboneError(f"{path}: missing, though step 'wave {k} {s}' recorded it; the run "
                                        f"directory was changed outside birdbone (`birdbone verify RUN`)")
                atomic.check_sha256(path, (rec.get("overlay") or {}).get("sha256"), f"the weights of wave {k} {s}")
                state.update(load_file(str(path)))
                break
        return state

    def load_into_working(self, state: dict[str, torch.Tensor]):
        model = self.working()
        model.load_state_dict(state, strict=True)
        return model


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (so -0.0 != 0.0 and NaN == NaN, as the ledger's hashes see them)."""
    t = t.detach().contiguous().reshape(-1)
    return t if t.dtype == torch.bool else t.view(torch.uint8)


def save_overlay(path: Path, start: dict[str, torch.Tensor], model) -> dict:
    """Write the tensors of `model` that differ (bitwise) from `start`; returns {changed tensors, elements}."""
    changed = {}
    for n, t in state_of(model).items():
        if not torch.equal(_bits(t), _bits(start[n])):
            changed[n] = t.contiguous().clone()
    with atomic.staged_file(path) as tmp:
        save_file(changed, str(tmp), metadata={"format": "birdbone-wave-overlay/1"})
    return {"tensors": len(changed), "elements": sum(t.numel() for t in changed.values()),
            "sha256": atomic.sha256_file(path)}


def finite_or_first_bad(model) -> str | None:
    """None when every parameter is finite, else the first non-finite parameter's name."""
    for n, p in model.named_parameters():
        if not torch.isfinite(p).all():
            return n
    return None
