import os

import pytest

from birdbone_core import atomic


def test_write_bytes_replaces_and_publishes(tmp_path):
    p = tmp_path / "a.json"
    atomic.write_json(p, {"x": 1})
    atomic.write_json(p, {"x": 2})
    assert p.read_text().strip().endswith("}") and '"x": 2' in p.read_text()
    assert (p.stat().st_mode & 0o777) == (0o666 & ~_umask())
    assert [f.name for f in tmp_path.iterdir()] == ["a.json"]


def test_failed_staged_file_and_dir_keep_the_good_output(tmp_path):
    good = tmp_path / "out.bin"
    good.write_bytes(b"good")
    with pytest.raises(RuntimeError):
        with atomic.staged_file(good) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert good.read_bytes() == b"good"
    d = tmp_path / "dir"
    with atomic.staged_dir(d) as tmp:
        (tmp / "f").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic.staged_dir(d) as tmp:
            (tmp / "f").write_text("v2")
            raise RuntimeError("crash")
    assert (d / "f").read_text() == "v1"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["dir", "out.bin"]


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_debris_of_a_killed_write_is_removed_by_the_next_write(tmp_path):
    """A SIGKILLed writer leaves `.NAME.PID.X.tmp`; the next write to NAME removes it once PID is gone,
    and leaves a live writer's temp, other targets' temps and foreign files alone."""
    import subprocess
    import sys

    code = ("import os, sys; from pathlib import Path; from birdbone_core import atomic\n"
            "held = [atomic.staged_file(Path(sys.argv[1]) / 'out.bin'), atomic.staged_dir(Path(sys.argv[1]) / 'outdir')]\n"
            "[c.__enter__() for c in held]\n"
            "os.kill(os.getpid(), 9)\n")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path)])
    assert p.returncode == -9
    debris = sorted(x.name for x in tmp_path.iterdir())
    assert len(debris) == 2 and all(d.endswith(".tmp") for d in debris)
    live = tmp_path / f".out.bin.{os.getpid()}.abc.tmp"      # this process is alive: not debris
    live.write_text("in progress")
    other = tmp_path / ".out.binary.1.abc.tmp"              # another target's name
    other.write_text("x")
    atomic.write_bytes(tmp_path / "out.bin", b"new")
    with atomic.staged_dir(tmp_path / "outdir") as d:
        (d / "f").write_text("v")
    left = sorted(x.name for x in tmp_path.iterdir())
    assert left == sorted(["out.bin", "outdir", live.name, other.name])
