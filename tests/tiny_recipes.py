"""Small recipes for end-to-end runs on the fixture model (tests/fixtures/tiny-llama), shared by the
Airflow tests (.venv-airflow, no torch) and the ops tests (.venv): plain YAML text, as a user writes it.

Every run here calibrates on 8 samples of 64 tokens and scores 64-token chunks: enough for the run to
be real (every step, the ledger, the GGUF), small enough to finish in seconds per step on one thread.
"""
from __future__ import annotations

import yaml


def tiny_recipe(name: str, prune: dict, *, waves: dict | None = None, n_samples: int = 8,
                max_chunks: int = 4, export: str = "f16") -> str:
    """The YAML text of a recipe: `prune` is the prune section, `waves` (see `waves`) the optional wave plan."""
    recipe = {
        "name": name,
        "calibration": {"n_samples": n_samples, "seq_len": 64},
        "evaluation": {"n_ctx": 64, "max_chunks": max_chunks},
        "prune": prune,
        "export": {"type": export},
    }
    if waves is not None:
        recipe["waves"] = waves
    return yaml.safe_dump(recipe, sort_keys=False)


def waves(max_per_wave: float, heal: dict, threshold: float, patience: int) -> dict:
    """A `waves:` section: prune at most `max_per_wave` per wave, heal, then the stop-loss on relative ppl."""
    return {"max_per_wave": max_per_wave, "heal": heal,
            "stop_loss": {"threshold": threshold, "patience": patience}}


# magnitude to 70% in two waves of 35%, no healing, +5% allowed once: wave 1 passes, wave 2 (about +50%)
# rolls the run back to wave 1
TOO_AGGRESSIVE = tiny_recipe("af-too-aggressive", {"method": "magnitude", "sparsity": 0.7},
                             waves=waves(0.35, {"method": "none"}, threshold=0.05, patience=1))
