"""Where the adaptive loop keeps its state in a run directory, and which step comes next.

    RUN/base/                       fast safetensors copy of the base model (every later step loads it)
    RUN/prepare/calibration.safetensors   calibration blocks [n, seq_len] and healing blocks (token ids)
    RUN/prepare/teacher_topk.safetensors  the dense model's top-k logits on the healing blocks (distill)
    RUN/prepare/allocation.json     per-layer sparsity map (prune.allocation: owl), computed once on the base
    RUN/prepare/prepare.json        completion marker of `prepare`
    RUN/waves/K/<step>.json         completion marker + metrics of `wave K <step>` (prune heal regrow evaluate)
    RUN/waves/K/<step>.safetensors  tensors that differ from the state at the start of wave K (until decide)
    RUN/waves/K/decision.json       the stop-loss decision; wave K is then in the ledger (overlays deleted)
    RUN/rollback.json               `rollback` ran: the ledger's last wave is a revert to the accepted state

A marker is written (atomically) only after everything the step produces, so "marker present" means
"step complete"; a step killed before its marker simply runs again from the same inputs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from birdbone_core import atomic
from birdbone_core.errors import BirdboneError

WAVE_STEPS = ("prune", "heal", "regrow", "evaluate", "decide")
WEIGHT_STEPS = ("prune", "heal", "regrow")   # steps that may change weights (overlay files)


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def base_dir(self) -> Path:
        return self.root / "base"

    @property
    def prepare_dir(self) -> Path:
        return self.root / "prepare"

    @property
    def calibration_path(self) -> Path:
        return self.prepare_dir / "calibration.safetensors"

    @property
    def teacher_path(self) -> Path:
        return self.prepare_dir / "teacher_topk.safetensors"

    @property
    def allocation_path(self) -> Path:
        return self.prepare_dir / "allocation.json"

    @property
    def prepare_marker(self) -> Path:
        return self.prepare_dir / "prepare.json"

    @property
    def rollback_marker(self) -> Path:
        return self.root / "rollback.json"

    def wave_dir(self, k: int) -> Path:
        return self.root / "waves" / str(k)

    def marker(self, k: int, step: str) -> Path:
        return self.wave_dir(k) / ("decision.json" if step == "decide" else f"{step}.json")

    def overlay(self, k: int, step: str) -> Path:
        return self.wave_dir(k) / f"{step}.safetensors"


def read_json(path: Path) -> dict | None:
    """A marker's content, or None when the step has not completed."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:  # markers are written atomically; a corrupt one was edited by hand
        raise BirdboneError(f"{path}: corrupt step record ({e.msg}); the run directory was changed outside birdbone "
                            f"(`birdbone verify RUN`); continue from a published copy (`birdbone pull`) or a new run") from None


def write_json(path: Path, obj: dict) -> None:
    atomic.write_json(path, obj)


def step_id(step: str, k: int | None = None) -> str:
    return f"wave {k} {step}" if k is not None else step


def plan(root: Path, n_waves: int, manifest_steps: dict) -> tuple[list[str], str | None, int | None, bool]:
    """(done step ids in order, the next step id or None, accepted wave, finished) for a run whose
    recipe has `n_waves` waves. The plan grows as decisions are made: after `wave K decide`, either
    wave K+1 follows (continue), or rollback (rollback) and then finish/export/evaluate (finish)."""
    lay = Layout(Path(root))
    done: list[str] = []
    accepted = None

    def visit(sid: str, is_done: bool) -> bool:
        if is_done:
            done.append(sid)
        return is_done

    if not visit("prepare", lay.prepare_marker.is_file()):
        return done, "prepare", accepted, False
    ending = None
    for k in range(1, n_waves + 1):
        for step in WAVE_STEPS:
            if not visit(step_id(step, k), lay.marker(k, step).is_file()):
                return done, step_id(step, k), accepted, False
        d = read_json(lay.marker(k, "decide"))
        accepted = d["accepted_wave"]
        if d["action"] != "continue":
            ending = d["action"]
            break
    if ending is None:  # cannot happen: the last wave always decides finish or rollback
        raise BirdboneError(f"{root}: wave {n_waves} decided to continue but the recipe has no wave {n_waves + 1}")
    tail = (["rollback"] if ending == "rollback" else []) + ["finish", "export", "evaluate"]
    for sid in tail:
        is_done = lay.rollback_marker.is_file() if sid == "rollback" else sid in manifest_steps
        if not visit(sid, is_done):
            return done, sid, accepted, False
    return done, None, accepted, True
