"""Do two run directories hold the same result? For checking that a refactoring changed no behaviour:

    python tests/benchmarks/compare_runs.py RUN_BEFORE RUN_AFTER [--md OUT.md]

Compares the exported GGUF (every tensor's bytes, and the metadata without keys naming paths) and the
ledger (the base state's digest, each wave's kind and state digest, and each delta file's sha256).
Exit status 1 when anything differs."""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import gguf


def gguf_digests(path: Path) -> dict[str, str]:
    r = gguf.GGUFReader(str(path))
    meta = {}
    for key, field in r.fields.items():
        if "path" in key.lower():
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # noqa: BLE001 - a field gguf-py cannot render: compare its raw parts
            meta[key] = [bytes(p).hex() for p in field.parts]
    tensors = hashlib.sha256()
    for t in r.tensors:
        tensors.update(t.name.encode() + bytes(t.data.tobytes()))
    return {"gguf tensors": tensors.hexdigest(),
            "gguf metadata": hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()}


def ledger_digests(run: Path) -> dict[str, str]:
    idx = json.loads((run / "ledger" / "index.json").read_text())
    out = {"ledger base state": idx["base"]}
    for w in idx["waves"]:
        out[f"ledger wave {w['wave']} ({w['kind']}) state"] = w["digest"]
        out[f"ledger wave {w['wave']} delta file"] = w["delta_sha256"]
    return out


def digests(run: Path) -> dict[str, str]:
    ggufs = sorted(run.glob("model-*.gguf"))
    if len(ggufs) != 1:
        sys.exit(f"error: {run}: expected one model-*.gguf, found {len(ggufs)}")
    return {**gguf_digests(ggufs[0]), **ledger_digests(run)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--md", type=Path, help="append the comparison as a Markdown table")
    a = ap.parse_args(argv)
    d0, d1 = digests(a.before), digests(a.after)
    rows = [(k, d0.get(k, "-"), d1.get(k, "-")) for k in dict.fromkeys([*d0, *d1])]
    lines = [f"`{a.before.name}`: before / after", "", "| what | before | after | same |", "|---|---|---|---|"]
    lines += [f"| {k} | `{x[:16]}` | `{y[:16]}` | {'yes' if x == y else 'NO'} |" for k, x, y in rows]
    print("\n".join(lines))
    if a.md:
        with a.md.open("a") as f:
            f.write("\n".join(lines) + "\n\n")
    return 0 if all(x == y for _, x, y in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
