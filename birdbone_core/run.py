"""A run directory: where each file lives, the manifest, the recipe as recorded, and the lock that keeps
one process at a time working on it.

    RUN/run.json                  manifest: model source, recipe hash, versions, completed steps
    RUN/recipe.yaml               the recipe as validated
    RUN/.lock                     held (flock) by the process working on the run; names it
    RUN/structured/               with a recipe `structure:` section: the cut model (HF dir, tokenizer.gguf for
                                  a GGUF source, structure.json), the base of every later step
    RUN/baseline/                 eval token chunks + the dense model's scored hidden states (for KL)
    RUN/pruned/                   the pruned model, a transformers-loadable safetensors dir
    RUN/prune_report.json         per-module sparsity, per-layer reconstruction error, time
    RUN/model-<type>.gguf         the export, served by stock llama.cpp
    RUN/metrics.json              base vs compressed: size, perplexity, KL, top-1
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file

from birdbone_core import atomic
from birdbone_core.errors import BirdboneError
from birdbone_core.recipe import Recipe, load_recipe
from birdbone_core.runtime import Placement, Runtime, place


@dataclass
class Run:
    root: Path
    runtime: Runtime | None = None   # this process's --device / --dtype (None: the recipe's `runtime:` alone)

    def placement(self) -> Placement:
        """Where this process's steps compute: the command line's runtime > the recipe's > auto (a device
        that does not exist here is a BirdboneError before any work)."""
        return place(self.runtime, self.recipe().runtime)

    @property
    def manifest_path(self) -> Path:
        return self.root / "run.json"

    @property
    def recipe_path(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def baseline_dir(self) -> Path:
        return self.root / "baseline"

    @property
    def reference_path(self) -> Path:
        return self.baseline_dir / "reference.safetensors"

    def reference(self) -> dict[str, torch.Tensor]:
        """The baseline's {"chunks", "hidden"}, checked against the hash the baseline step recorded."""
        atomic.check_sha256(self.reference_path, self.manifest()["steps"].get("baseline", {}).get("reference_sha256"),
                            "the dense model's outputs, from `baseline`")
        return load_file(str(self.reference_path))

    @property
    def pruned_dir(self) -> Path:
        return self.root / "pruned"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.json"

    @property
    def lock_path(self) -> Path:
        return self.root / ".lock"

    @contextlib.contextmanager
    def locked(self, command: str):
        """Hold the run's lock (flock on RUN/.lock) while `command` changes the run. A second process waits,
        naming the holder; the OS releases the lock when the holder exits or is killed, so a crash never
        leaves a run locked."""
        self.manifest()                                        # only a run directory has a lock
        with open(self.lock_path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                print(f"{self.root} is being worked on by {holder}; waiting for it to finish",
                      file=sys.stderr, flush=True)
                fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            f.truncate()
            f.write(f"PID {os.getpid()} ({command}, since {datetime.now(timezone.utc).isoformat(timespec='seconds')})\n")
            f.flush()
            yield self                                         # closing f releases the lock

    def gguf_path(self, recipe: Recipe) -> Path:
        kind = "mixed" if recipe.quantize is not None else recipe.export.type
        return self.root / f"model-{kind}.gguf"

    def manifest(self) -> dict:
        if not self.manifest_path.is_file():
            raise BirdboneError(f"{self.root}: not a birdbone run directory (no run.json); create it with `birdbone init`")
        try:
            m = json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise BirdboneError(f"{self.manifest_path}: corrupt manifest ({e.msg})") from None
        except (UnicodeDecodeError, OSError) as e:
            raise BirdboneError(f"{self.manifest_path}: unreadable manifest ({e})") from None
        if not (isinstance(m, dict) and isinstance(m.get("model"), dict) and isinstance(m.get("steps"), dict)
                and isinstance(m["model"].get("path"), str) and isinstance(m.get("recipe_sha256"), str)):
            raise BirdboneError(f"{self.manifest_path}: corrupt manifest (not the run record `birdbone init` writes)")
        return m

    def recipe(self) -> Recipe:
        """The run's recipe, refused when it no longer is the one `init` recorded (edited by hand)."""
        recipe = load_recipe(self.recipe_path)
        recorded = self.manifest().get("recipe_sha256")
        if recipe.sha256() != recorded:
            raise BirdboneError(f"{self.recipe_path}: changed since `birdbone init` recorded it (sha256 "
                                f"{recipe.sha256()[:12]} != {str(recorded)[:12]}); start a new run directory "
                                f"with the new recipe")
        return recipe

    def model_spec(self) -> str:
        """The model the run started from (as given to `init`)."""
        return self.manifest()["model"]["path"]

    @property
    def structured_dir(self) -> Path:
        return self.root / "structured"

    def base_spec(self) -> str:
        """The model every step after the structural cuts works from: RUN/structured/ when the recipe has a
        `structure:` section (run_init.ensure_structured writes it), else the model the run started from."""
        return str(self.structured_dir) if self.recipe().structure is not None else self.model_spec()

    def tokenizer_gguf(self) -> Path | None:
        """The GGUF whose tokenizer.* keys an export copies: the cut model's own, else the source GGUF."""
        from birdbone_core.export.vocab import TOKENIZER_GGUF

        own = self.structured_dir / TOKENIZER_GGUF
        if self.recipe().structure is not None:
            return own if own.is_file() else None
        m = self.manifest()["model"]
        return Path(m["path"]) if m["kind"] == "gguf" else None

    def load_options(self) -> dict:
        return self.manifest()["model"].get("options", {})

    def mark_done(self, step: str, info: dict) -> None:
        m = self.manifest()
        m["steps"][step] = {"finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), **info}
        atomic.write_json(self.manifest_path, m)

    def done(self, step: str) -> bool:
        return step in self.manifest().get("steps", {})

    def require(self, step: str, needed_by: str) -> None:
        if not self.done(step):
            raise BirdboneError(f"{self.root}: step '{step}' has not run yet (needed by '{needed_by}')")
