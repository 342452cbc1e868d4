import copy
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BIRDBONE_PROGRESS", "0")
# One torch thread unless the caller says otherwise (set before anything imports torch; subprocesses
# inherit it): the fixture model's matrices are too small to gain from a second thread, and on a busy
# 2-core machine two threads per process make every forward and backward several times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

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
