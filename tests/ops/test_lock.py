"""The package lock requirements/birdbone.txt: well formed, consistent with pyproject.toml's ranges, complete
for every extra, and what the Makefile installed. Nothing here asks PyPI anything: a new release upstream
cannot turn these red, only a lock that disagrees with the project or with the installed environment."""
import importlib.metadata as md
import importlib.util
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCK_FILE = ROOT / "requirements" / "birdbone.txt"

_spec = importlib.util.spec_from_file_location("birdbone_requirements_lock", ROOT / "requirements" / "lock.py")
lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock)

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
PINS = lock.read(LOCK_FILE)
# the Makefile's venv: only there does "installed" mean "installed from the lock"
MAKEFILE_VENV = Path(sys.prefix).resolve() == (ROOT / ".venv").resolve()


def _requirements(extra: str | None) -> list[Requirement]:
    lines = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    return [Requirement(x) for x in lines]


def test_lock_is_exact_pins_one_per_distribution():
    lines = [ln for ln in LOCK_FILE.read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines == sorted(lines, key=lambda ln: canonicalize_name(ln.split("==")[0]))
    for ln in lines:
        assert re.fullmatch(r"[a-z0-9][a-z0-9-]*==[0-9][0-9A-Za-z.!]*", ln), ln       # no ranges, no local tags
    assert len(PINS) == len(lines)
    assert "birdbone-core" not in PINS and "pip" in PINS


@pytest.mark.parametrize("extra", [None, *sorted(PROJECT["optional-dependencies"])])
def test_lock_pins_every_requirement_within_pyprojects_range(extra):
    for req in _requirements(extra):
        if req.marker is not None and not req.marker.evaluate({"extra": extra or ""}):
            continue
        key = canonicalize_name(req.name)
        assert key in PINS, f"{req} ({extra or 'core'}) is not in the lock: run `make lock`"
        assert req.specifier.contains(PINS[key], prereleases=True), \
            f"the lock's {key}=={PINS[key]} is outside pyproject.toml's {req}: run `make lock`"


def test_lock_generator_round_trips_the_file():
    assert lock.read(LOCK_FILE) == PINS
    text = lock.render(PINS)
    assert [ln for ln in text.splitlines() if not ln.startswith("#")] == \
           [ln for ln in LOCK_FILE.read_text().splitlines() if ln and not ln.startswith("#")]


def test_lock_pins_no_hub_fetching_kernels_package():
    # `kernels` downloads compiled kernels from a model hub at import time; bitsandbytes/transformers pick it
    # up when present. A lock that pulls it in is a lock that breaks offline runs.
    assert "kernels" not in PINS


@pytest.mark.skipif(not MAKEFILE_VENV, reason="the installed environment is the lock's only in the Makefile's .venv")
def test_installed_environment_is_the_lock():
    """Every distribution the installed extras pull in is pinned, at the version installed (closure from
    the installed metadata, markers evaluated), and pip is the locked one."""
    installed = [e for e in PROJECT["optional-dependencies"]
                 if all(_installed(r) for r in _requirements(e))]
    assert {"test", "llamacpp", "heal", "tasks", "ops"} <= set(installed), installed   # what `make test` installs
    got = lock.closure(lock.ROOT_DIST, tuple(installed))
    unpinned = sorted(set(got) - set(PINS))
    assert not unpinned, f"installed but not in the lock: {unpinned} (run `make lock`)"
    drift = {k: (lock.public(v), PINS[k]) for k, v in got.items() if lock.public(v) != PINS[k]}
    assert not drift, f"installed != locked: {drift}"
    assert md.version("pip") == PINS["pip"]


def _installed(req: Requirement) -> bool:
    try:
        md.version(req.name)
        return True
    except md.PackageNotFoundError:
        return False
