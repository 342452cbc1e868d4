"""The GPU suite (marker `gpu`, tests/gpu/run.sh): the same work on a CUDA device and on the CPU, compared on
the fixture model. Every test is skipped where torch sees no CUDA device.

BIRDBONE_GPU_SUITE_DEVICE names the device compared with the CPU (default cuda; cuda:N for another card).
Set to `cpu`, the suite compares the CPU with itself: a dry run of the suite's own code on a machine
without CUDA (it proves the tests run, not that CUDA agrees). BIRDBONE_GPU_RESULTS=PATH: the measurements
(mask agreement, GPTQ error ratios, KLD, loss curves) are written there as JSON at the end of the
session, for run.sh's results file.
"""
import json
import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device(os.environ.get("BIRDBONE_GPU_SUITE_DEVICE", "cuda"))


@pytest.fixture(scope="session")
def record(device):
    """record(test, quantity, value, criterion): one measured number for the results file."""
    rows: list[dict] = []

    def add(test: str, quantity: str, value, criterion: str = "") -> None:
        rows.append({"test": test, "quantity": quantity, "value": value, "criterion": criterion})
    yield add
    path = os.environ.get("BIRDBONE_GPU_RESULTS")
    if path and rows:
        Path(path).write_text(json.dumps({"device": str(device), "rows": rows}, indent=1))
