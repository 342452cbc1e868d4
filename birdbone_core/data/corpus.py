"""The Python 3.11 docs corpus, cut into named, disjoint slices by file index.

The corpus (`python-docs-3.11.txt.gz`, PSF license) is 497 reStructuredText files, each introduced by a
line `===== path =====`, in sorted path order. Slices are half-open ranges of file indices so anyone can
rebuild them from the same source. They never overlap:

    train  : fixture-model training        files [0, 89) + [98, 440) + [468, 497)
    task   : reserved for task evaluation  files [89, 98)     faq/*
    eval   : default evaluation text       files [440, 451)   reference/*
    calib  : default calibration text      files [451, 468)   tutorial/*

Only `calib` and `eval` ship with the package (gzip, package data). Rebuild them with
    python -m birdbone_core.data.corpus ../shared/data/python-docs-3.11.txt.gz
"""
from __future__ import annotations

import gzip
import re
import sys
from pathlib import Path

SLICES: dict[str, list[tuple[int, int]]] = {
    "train": [(0, 89), (98, 440), (468, 497)],
    "task": [(89, 98)],
    "eval": [(440, 451)],
    "calib": [(451, 468)],
}
SHIPPED = ("calib", "eval")
PACKAGE_DATA = Path(__file__).parent / "text"
_HEADER = re.compile(r"^===== (\S+\.txt) =====$", re.M)


def split_corpus(text: str) -> list[tuple[str, str]]:
    """Split the corpus into [(path, body)] in file order."""
    parts = _HEADER.split(text)
    return list(zip(parts[1::2], parts[2::2]))


def slice_text(files: list[tuple[str, str]], name: str) -> str:
    """Concatenate the files of slice `name`, each kept under its `===== path =====` header."""
    if name not in SLICES:
        raise KeyError(f"unknown slice {name!r}; known: {', '.join(SLICES)}")
    out = []
    for lo, hi in SLICES[name]:
        for path, body in files[lo:hi]:
            out.append(f"===== {path} =====\n{body.strip()}\n")
    return "\n".join(out)


def shipped_path(name: str) -> Path:
    """Path of a slice shipped as package data (`calib` or `eval`)."""
    if name not in SHIPPED:
        raise KeyError(f"slice {name!r} is not shipped; shipped: {', '.join(SHIPPED)}")
    return PACKAGE_DATA / f"python-docs-3.11-{name}.txt.gz"


def main(argv: list[str]) -> None:
    src = Path(argv[0]) if argv else Path("../shared/data/python-docs-3.11.txt.gz")
    files = split_corpus(gzip.open(src, "rt", encoding="utf-8").read())
    if len(files) != 497:
        raise SystemExit(f"{src}: expected 497 files, found {len(files)}")
    PACKAGE_DATA.mkdir(exist_ok=True)
    for name in SHIPPED:
        # mtime=0 keeps the gzip bytes reproducible
        with open(shipped_path(name), "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
            gz.write(slice_text(files, name).encode("utf-8"))
        print(name, shipped_path(name), shipped_path(name).stat().st_size, "bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
