"""Helpers for the Airflow tests (this venv has no torch: tensors are compared as raw safetensors bytes)."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIRDBONE = Path(os.environ.get("BIRDBONE_CLI", REPO / ".venv" / "bin" / "birdbone"))
FIXTURE = REPO / "tests" / "fixtures" / "tiny-llama"
if str(REPO) not in sys.path:          # the repository's operators/ package
    sys.path.insert(0, str(REPO))

needs_cli = pytest.mark.skipif(not BIRDBONE.is_file(), reason=f"{BIRDBONE} not built (make venv)")


def airflow_bin() -> str:
    return str(Path(sys.executable).with_name("airflow"))


def birdbone(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The main venv's CLI (the oracle for states: revert is checked against the ledger's hashes)."""
    return subprocess.run([str(BIRDBONE), *args], capture_output=True, text=True, check=check, env=os.environ.copy())


def read_safetensors(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """name -> (dtype, shape, raw bytes), straight from the file format (no torch in this venv)."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    return {k: (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]])
            for k, v in header.items() if k != "__metadata__"}


def model_tensors(model_dir: Path) -> dict[str, tuple[str, list[int], bytes]]:
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(read_safetensors(f))
    assert out, f"no safetensors in {model_dir}"
    return out


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
