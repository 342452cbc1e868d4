"""The run report: tables and healing curves for one run directory (`birdbone report RUN`).

    data.py      collect the run's numbers (run.json, ledger, waves/K/*.json, prune_report.json, metrics.json)
    plots.py     the PNG figures (matplotlib, Agg canvas)
    markdown.py  report.md (tables, every decision with its reason, image links)
    html.py      report.html: the same, one self-contained file (figures inlined)
    cli.py       `birdbone report RUN [-o DIR]`
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["write_report"]

REPORT_FILES = ("report.md", "report.html")


def _check_out_dir(out_dir: Path, run_root: Path) -> None:
    """The report directory is replaced as a whole: refuse one that holds anything a report did not write
    (e.g. `-o .` or `-o RUN`), so a typo can never delete a user's files."""
    from birdbone_core.errors import BirdboneError

    if out_dir.resolve() == run_root.resolve() or run_root.resolve().is_relative_to(out_dir.resolve()):
        raise BirdboneError(f"{out_dir}: the report directory cannot be the run directory or contain it")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise BirdboneError(f"{out_dir}: exists and is not a directory")
    foreign = [p.name for p in out_dir.iterdir() if not (p.is_file() and (p.name in REPORT_FILES
                                                                          or p.suffix == ".png"))]
    if foreign:
        raise BirdboneError(f"{out_dir}: exists and holds '{sorted(foreign)[0]}', which is not part of a report; "
                            f"choose a new or empty directory")


def write_report(run_root: Path, out_dir: Path | None = None) -> Path:
    """Write report.md, report.html and the PNGs to out_dir (default RUN/report/), replacing a previous
    report only once the new one is complete. Returns the path of report.md. Raises BirdboneError when
    run_root is not a run directory, holds a corrupt file, or out_dir holds files that are not a report's;
    missing pieces of the run are listed in the report instead."""
    from birdbone_core import atomic
    from birdbone_core.report.collect import collect
    from birdbone_core.report.html import to_html
    from birdbone_core.report.markdown import render
    from birdbone_core.report.plots import FIGURES

    run_root = Path(run_root)
    data = collect(run_root)
    out_dir = Path(out_dir) if out_dir is not None else run_root / "report"
    _check_out_dir(out_dir, run_root)
    with atomic.staged_dir(out_dir) as tmp:
        drawn = []
        for name, fn, caption in FIGURES:
            ok = fn(data, tmp / name)
            drawn.append((name, caption, ok))
            if not ok:
                data.missing.append(f"figure {name} not drawn: the run has no data for it")
        md = render(data, drawn)
        atomic.write_text(tmp / "report.md", md)
        atomic.write_text(tmp / "report.html", to_html(md, tmp, f"birdbone run report: {data.name}"))
    return out_dir / "report.md"
