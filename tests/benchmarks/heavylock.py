"""The machine-wide heavy-job lock the benchmark harness's phases take (the same flock(2) lock
`flock /tmp/birdbone-heavy.lock` takes), reentrant within one process.

    with heavy("llama-imatrix"):        # waits for the lock, prints "[lock] llama-imatrix"
        with heavy("inner step"):       # already held: no second acquisition
            ...

`LOCK_ALL = False` makes every call a no-op except `heavy(..., always=True)` (the fixture: its jobs take
seconds and < 1 GB). BIRDBONE_HEAVY_LOCK= (empty) disables the lock; a path moves it.
"""
from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager

LOCK_ALL = True
_HELD = [0]  # nesting depth: a phase holding the lock makes its jobs' own heavy() calls no-ops


@contextmanager
def heavy(what: str, always: bool = False):
    """Hold the heavy-job lock for the block. Reentrant: the harness holds it per phase (a few minutes
    each) rather than per tool run, since every acquisition waits behind other users' whole jobs."""
    path = os.environ.get("BIRDBONE_HEAVY_LOCK", "/tmp/birdbone-heavy.lock")
    if not path or not (LOCK_ALL or always) or _HELD[0]:
        _HELD[0] += 1
        try:
            yield
        finally:
            _HELD[0] -= 1
        return
    _HELD[0] += 1
    try:
        with open(path, "a") as f:
            t0 = time.perf_counter()
            fcntl.flock(f, fcntl.LOCK_EX)
            waited = time.perf_counter() - t0
            print(f"[lock] {what}" + (f" (waited {waited:.0f} s)" if waited > 1 else ""), flush=True)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    finally:
        _HELD[0] -= 1
