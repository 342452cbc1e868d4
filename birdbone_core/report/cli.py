"""`birdbone report RUN [-o DIR]`: the run report with healing curves (Markdown + PNGs)."""
from __future__ import annotations

from pathlib import Path


def _cmd_report(a) -> int:
    from birdbone_core.report import write_report

    path = write_report(Path(a.run), Path(a.out) if a.out else None)
    print(path)
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("report", help="report.md with per-wave tables, decisions and healing-curve plots")
    p.add_argument("run", help="run directory")
    p.add_argument("-o", "--out", help="output directory (default: RUN/report/)")
    p.set_defaults(fn=_cmd_report)
