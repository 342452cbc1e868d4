import yaml
import pytest

from birdbone_core.steps import init_run


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
