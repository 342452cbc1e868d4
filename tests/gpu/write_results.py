"""tests/gpu/run.sh's results file: DIR (junit.xml, measured.json, pytest.txt of one GPU-suite run) -> OUT.md.

    python tests/gpu/write_results.py DIR OUT.md PYTEST_EXIT_STATUS
"""
import json
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path


def _outcomes(junit: Path) -> list[tuple[str, str, str]]:
    """(test id, outcome, first line of the failure/skip message) per test case."""
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, why = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                why = (el.get("message") or "").strip().splitlines()[0][:160] if el.get("message") else ""
                break
        rows.append((case.get("name", "?"), outcome, why))
    return rows


def _fmt(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def main(src: str, out: str, rc: str) -> None:
    import torch
    import transformers

    d = Path(src)
    dev = torch.cuda.current_device()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip()
    outcomes = _outcomes(d / "junit.xml") if (d / "junit.xml").is_file() else []
    measured = json.loads((d / "measured.json").read_text()) if (d / "measured.json").is_file() else {"rows": []}
    counts = {k: sum(1 for _, o, _ in outcomes if o == k) for k in ("passed", "FAILED", "ERROR", "skipped")}
    lines = [
        "# GPU suite: CUDA against CPU on the fixture model",
        "",
        f"Written by `tests/gpu/run.sh` on {datetime.now(timezone.utc).isoformat(timespec='seconds')} from one run "
        f"of `pytest tests/gpu -m gpu` (exit status {rc}). The criteria are in tests/gpu/test_gpu_parity.py.",
        "",
        f"- device: {measured.get('device', '?')} = {torch.cuda.get_device_name(dev)}, "
        f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s)",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}",
        f"- commit {commit or '?'}{' (with uncommitted changes)' if dirty else ''}",
        f"- tests: {counts['passed']} passed, {counts['FAILED']} failed, {counts['ERROR']} errors, "
        f"{counts['skipped']} skipped",
        "",
        "## Outcomes",
        "",
        "| test | outcome | message |",
        "|---|---|---|",
        *[f"| `{name}` | {o} | {why.replace('|', '/')} |" for name, o, why in outcomes],
        "",
        "## Measured",
        "",
        "| comparison | quantity | value | criterion |",
        "|---|---|---|---|",
        *[f"| {r['test']} | {r['quantity']} | {_fmt(r['value'])} | {r['criterion']} |" for r in measured["rows"]],
        "",
    ]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("\n".join(lines))


if __name__ == "__main__":
    main(*sys.argv[1:4])
