"""Progress bars on stderr (rich), so stdout stays clean for tables and JSON."""
from __future__ import annotations

import contextlib
import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_console = Console(stderr=True)


def console() -> Console:
    return _console


@contextlib.contextmanager
def progress_bar(description: str, total: int):
    """Yields advance(n=1). Disabled with BIRDBONE_PROGRESS=0 (tests), plain when stderr is no TTY."""
    if os.environ.get("BIRDBONE_PROGRESS", "1") == "0":
        yield lambda n=1: None
        return
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), console=_console, transient=False,
        disable=not sys.stderr.isatty() and os.environ.get("BIRDBONE_PROGRESS") != "1",
    ) as prog:
        task = prog.add_task(description, total=total)
        yield lambda n=1: prog.advance(task, n)
        if not sys.stderr.isatty():
            _console.print(f"{description}: done ({total}/{total})")
