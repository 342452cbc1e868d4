"""Atomic writes: a partial output never replaces a good one. Write beside the target, then rename.

Temp names carry the writer's PID (`.NAME.PID.RANDOM.tmp`): a write that was killed leaves one behind,
and the next write to the same target removes it once that PID is gone. A directory birdbone writes as a
user-named output holds OUTPUT_MARK, so a later write may replace it; any other non-empty directory is
refused by check_output_dir, never deleted."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from birdbone_core.errors import BirdboneError

OUTPUT_MARK = ".birdbone-output"        # in every output directory birdbone may replace later


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path | str, is_dir: bool) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; published ones get the usual umask mode."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_sha256(path: Path, expected: str | None, what: str) -> None:
    """Refuse a file a step wrote earlier when its bytes no longer hash to what was recorded then
    (bit rot, a hand edit, a file copied in from another run). `expected` None: recorded by an older
    birdbone that kept no hash; nothing to check."""
    if expected is None:
        return
    if not Path(path).is_file():
        raise BirdboneError(f"{path}: missing ({what})")
    if sha256_file(path) != expected:
        raise BirdboneError(f"{path}: its bytes differ from the sha256 recorded when it was written ({what}); "
                            f"the file was damaged or replaced (`birdbone verify RUN` checks the whole run)")


def write_bytes(path: Path, data: bytes) -> None:
    with staged_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                  # another user's live process
        return True
    return True


def remove_debris(path: Path) -> list[Path]:
    """Remove the temp files/dirs that killed writes to `path` left beside it (their writer is dead)."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.[^.]+\.tmp$")
    gone = []
    if not path.parent.is_dir():
        return gone
    for p in path.parent.iterdir():
        m = pattern.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def check_output_dir(path: Path, what: str, *, not_within: Path | None = None) -> None:
    """Refuse `path` as a directory to (re)place unless it is absent, empty, or an output birdbone wrote
    (holds OUTPUT_MARK). `not_within`: a directory (a run) that `path` may neither be, contain nor lie in."""
    path = Path(path)
    if not_within is not None:
        p, r = path.resolve(), Path(not_within).resolve()
        if p == r or r.is_relative_to(p) or p.is_relative_to(r):
            raise BirdboneError(f"{path}: the {what} cannot be the run directory {not_within}, contain it or lie in it")
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir() or path.is_symlink():
        raise BirdboneError(f"{path}: exists and is not a directory; choose a new or empty directory for the {what}")
    names = sorted(p.name for p in path.iterdir())
    if names and OUTPUT_MARK not in names:
        raise BirdboneError(f"{path}: exists and holds '{names[0]}', which birdbone did not write; "
                            f"choose a new or empty directory for the {what}")


def check_output_file(path: Path, what: str, ours: Callable[[Path], bool]) -> None:
    """Refuse `path` as a file to (re)place unless it is absent or `ours(path)` says birdbone wrote it."""
    path = Path(path)
    if path.is_dir():
        raise BirdboneError(f"{path}: is a directory; give a file path for the {what}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise BirdboneError(f"{path}: {parent} is not a directory")
            break
    if (path.exists() or path.is_symlink()) and not ours(path):
        raise BirdboneError(f"{path}: exists and birdbone did not write it; choose another path for the {what}")


@contextlib.contextmanager
def staged_file(path: Path):
    """Yields a temp path beside `path`; renamed onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_debris(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _publish_mode(tmp, is_dir=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def staged_dir(path: Path, mark: bool = False):
    """Yields a fresh temp dir beside `path`; it replaces `path` only if the block succeeds. `mark`: the
    result holds OUTPUT_MARK (a user-named output that a later write may replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_debris(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if mark:
            (tmp / OUTPUT_MARK).write_text("written by birdbone; birdbone may replace this directory\n")
        _publish_mode(tmp, is_dir=True)
        for f in tmp.rglob("*"):
            if f.is_file() and not (f.stat().st_mode & 0o044):
                _publish_mode(f, is_dir=False)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
