import hashlib
import json

import pytest
import yaml

from birdbone_core.run_init import init_run


def _make_recipe(prune: dict, waves: dict | None = None, name: str = "loop") -> dict:
    r = {"name": name, "calibration": {"n_samples": 8, "seq_len": 64},
         "evaluation": {"n_ctx": 128, "max_chunks": 4}, "prune": prune, "export": {"type": "f16"}}
    if waves is not None:
        r["waves"] = waves
    return r


@pytest.fixture
def new_run(tiny_path):
    def make(root, recipe: dict):
        root.parent.mkdir(parents=True, exist_ok=True)
        rp = root.parent / f"{root.name}.yaml"
        rp.write_text(yaml.safe_dump(recipe))
        return init_run(root, str(tiny_path), str(rp))
    return make


@pytest.fixture(scope="session")
def make_recipe():
    return _make_recipe


@pytest.fixture
def nan_wave_run(tmp_path, new_run):
    """A 2-wave magnitude run whose wave 1 prune output holds one NaN (a diverged step), stopped before
    `wave 1 evaluate`. Returns (run, overlay path, poisoned tensor name)."""
    from safetensors.torch import load_file, save_file

    from birdbone_core.loop.context import Context
    from birdbone_core.loop.driver import run_step

    def make(stop_loss: dict):
        run = new_run(tmp_path / "nan", _make_recipe({"method": "magnitude", "sparsity": 0.4},
                                                     {"max_per_wave": 0.2, "heal": {"method": "none"},
                                                      "stop_loss": stop_loss}))
        for sid in ("prepare", "wave 1 prune", "wave 1 heal", "wave 1 regrow"):
            run_step(Context(run), sid)
        ov = run.root / "waves" / "1" / "prune.safetensors"
        t = load_file(str(ov))
        name = next(n for n in t if "down_proj" in n)
        t[name][0, 0] = float("nan")
        save_file(t, str(ov))
        # as if the step itself had written the NaN: the marker records the poisoned file's hash
        marker = ov.with_name("prune.json")
        rec = json.loads(marker.read_text())
        rec["overlay"]["sha256"] = hashlib.sha256(ov.read_bytes()).hexdigest()
        marker.write_text(json.dumps(rec))
        return run, ov, name
    return make
