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
