"""Rich tables for `birdbone log RUN` and `birdbone diff RUN A B`."""
from __future__ import annotations

from rich.console import Group
from rich.markup import escape
from rich.table import Table

from birdbone_core.ledger.entries import WaveDiff, WaveEntry

MAX_METRIC_COLUMNS = 6


def _flat_metrics(m: dict, prefix: str = "") -> dict[str, object]:
    """{"eval": {"ppl": 3.1}} -> {"eval.ppl": 3.1}; lists are shown as-is."""
    out: dict[str, object] = {}
    for k, v in m.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_metrics(v, key + "."))
        else:
            out[key] = v
    return out


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, list) and any(isinstance(x, list) for x in v):   # e.g. healing curves per layer
        return f"[{len(v)} series of {sum(len(x) for x in v if isinstance(x, list)):,} values]"
    if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):   # e.g. gradual rollback stages
        return f"[{len(v)} records]"
    if isinstance(v, list) and len(v) > 8:   # a long per-layer / per-step series: its length
        return f"[{len(v)} values]"
    return escape(str(v))


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _metric_keys(entries: list[WaveEntry]) -> list[str]:
    keys: list[str] = []
    for e in entries:
        for k in _flat_metrics(e.metrics):
            if k not in keys:
                keys.append(k)
    return keys


def format_log(entries: list[WaveEntry]) -> Table:
    """One row per wave: kind, time, elements changed, whole-state sparsity, delta size, decision, metrics."""
    keys = _metric_keys(entries)
    wide = len(keys) > MAX_METRIC_COLUMNS
    t = Table(title="ledger")
    t.add_column("wave", justify="right")
    for col in ("kind", "time"):
        t.add_column(col)
    for col in ("changed", "sparsity", "delta"):
        t.add_column(col, justify="right")
    t.add_column("decision")
    if wide:
        t.add_column("metrics")
    else:
        for k in keys:
            t.add_column(escape(k), justify="right")
    for e in entries:
        kind = e.kind if e.reverts_to is None else f"revert→{e.reverts_to}"
        row = [str(e.wave), kind, e.time.replace("T", " ").removesuffix("+00:00"),
               "-" if e.kind == "base" else f"{e.changed:,}", f"{e.sparsity:.2%}",
               "-" if e.kind == "base" else _bytes(e.delta_bytes), _fmt(e.decision)]
        m = _flat_metrics(e.metrics)
        if wide:
            row.append(", ".join(f"{escape(k)}={_fmt(v)}" for k, v in m.items()))
        else:
            row += [_fmt(m.get(k)) for k in keys]
        t.add_row(*row)
    return t


def format_diff(diff: WaveDiff, top: int | None = None) -> Group:
    """Two tables: both waves' metrics side by side, then the changed tensors (largest change first,
    at most `top` rows)."""
    a, b = diff.a, diff.b
    ma, mb = _flat_metrics(a.metrics), _flat_metrics(b.metrics)
    mt = Table(title=f"wave {a.wave} → wave {b.wave}")
    mt.add_column("")
    mt.add_column(f"wave {a.wave}", justify="right")
    mt.add_column(f"wave {b.wave}", justify="right")
    mt.add_column("Δ", justify="right")
    mt.add_row("kind", a.kind, b.kind, "")
    mt.add_row("sparsity", f"{a.sparsity:.2%}", f"{b.sparsity:.2%}", f"{b.sparsity - a.sparsity:+.2%}")
    for k in dict.fromkeys([*ma, *mb]):
        va, vb = ma.get(k), mb.get(k)
        num = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (va, vb))
        mt.add_row(escape(k), _fmt(va), _fmt(vb), f"{vb - va:+.4g}" if num else "")
    rows = sorted(diff.tensors, key=lambda r: r.l2, reverse=True)
    shown = rows if top is None else rows[:top]
    title = f"{len(rows)} tensors changed, {diff.changed:,} elements"
    if len(shown) < len(rows):
        title += f" (largest {len(shown)} shown)"
    tt = Table(title=title)
    tt.add_column("tensor")
    for col in ("changed", "of", "L2 of change", f"sparsity @{a.wave}", f"sparsity @{b.wave}"):
        tt.add_column(col, justify="right")
    for r in shown:
        tt.add_row(escape(r.name), f"{r.changed:,}", f"{r.changed / max(r.numel, 1):.2%}", f"{r.l2:.4g}",
                   f"{r.sparsity_a:.2%}", f"{r.sparsity_b:.2%}")
    return Group(mt, tt)
