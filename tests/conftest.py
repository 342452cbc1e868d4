import copy
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BIRDBONE_PROGRESS", "0")

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-llama"


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    return FIXTURE


@pytest.fixture(scope="session")
def _tiny_loaded():
    from birdbone_core.model.load import load_model
    return load_model(str(FIXTURE))


@pytest.fixture
def tiny(_tiny_loaded):
    """A fresh copy of the trained fixture model (tests may prune it in place)."""
    return copy.deepcopy(_tiny_loaded)
