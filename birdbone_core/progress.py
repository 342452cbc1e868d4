"""Progress on stderr, so stdout stays clean for tables and JSON.

A live rich bar on a terminal; in logs (no TTY, e.g. an Airflow task) one line per ~10% of the work.
BIRDBONE_PROGRESS=0 silences both (tests).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_console = Console(stderr=True)


def console() -> Console:
    return _console


@contextlib.contextmanager
def progress_bar(description: str, total: int):
    """Yields advance(n=1)."""
    if os.environ.get("BIRDBONE_PROGRESS", "1") == "0":
        yield lambda n=1: None
        return
    if sys.stderr.isatty():
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TimeRemainingColumn(), console=_console) as prog:
            task = prog.add_task(description, total=total)
            yield lambda n=1: prog.advance(task, n)
        return
    t0 = time.perf_counter()
    state = {"done": 0, "next": 0.0}

    def advance(n: int = 1) -> None:
        state["done"] += n
        frac = state["done"] / max(total, 1)
        if frac >= state["next"] or state["done"] >= total:
            print(f"{description}: {state['done']}/{total} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
            state["next"] = frac + 0.1

    yield advance
