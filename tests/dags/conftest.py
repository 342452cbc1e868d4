"""Airflow tests run in their own venv (.venv-airflow: Airflow, no torch) and call the birdbone CLI of the
main venv as a subprocess, exactly as a deployment does. Airflow reads its settings at import, so this file
sets them (a private AIRFLOW_HOME with a SQLite DB) before any test imports airflow."""
from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from airflow_testlib import BIRDBONE, REPO, airflow_bin

if importlib.util.find_spec("airflow") is None:
    # the main venv (no Airflow) collecting tests/: these tests belong to .venv-airflow (make test-airflow)
    collect_ignore_glob = ["test_*.py"]

_HOME = Path(tempfile.mkdtemp(prefix="birdbone-airflow-"))
atexit.register(shutil.rmtree, _HOME, True)
AIRFLOW_ENV = {
    "AIRFLOW_HOME": str(_HOME / "home"),
    "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_HOME / 'home' / 'airflow.db'}",
    "AIRFLOW_VAR_BIRDBONE_CLI": str(BIRDBONE),
    "AIRFLOW_VAR_BIRDBONE_EXECUTOR": "local",
    "AIRFLOW_VAR_BIRDBONE_RUNS_ROOT": str(_HOME / "runs"),
    # the birdbone steps: one thread (identical results across runs), no hub, no progress bars
    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "BIRDBONE_PROGRESS": "0",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
if importlib.util.find_spec("airflow") is not None:
    os.environ.update(AIRFLOW_ENV)
    os.environ.pop("BIRDBONE_PUSHGATEWAY", None)
(_HOME / "home").mkdir(parents=True)
(_HOME / "runs").mkdir()


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated SQLite metadata DB in the private AIRFLOW_HOME."""
    subprocess.run([airflow_bin(), "db", "migrate"], check=True, env=os.environ.copy(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return _HOME / "home"


@pytest.fixture(scope="session")
def runs_root() -> Path:
    return _HOME / "runs"


@pytest.fixture(scope="session")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))
