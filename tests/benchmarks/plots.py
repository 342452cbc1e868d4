"""Plots and the Pareto front for the benchmark harness (matplotlib, Agg backend, PNG files).

    pareto_front([(bpw, kld, label), ...])      -> the points no other point beats on both axes
    plot_kld_vs_bpw(rows, path, title, styles)  # log-scale KLD vs bits per weight, front drawn as a step line
    group_styles(groups, fixed)                 # marker + colour per legend group (fixed ones kept, others distinct)
    plot_ppl_vs_sparsity(rows, path, title)     # perplexity vs measured sparsity (linear axes), one series per tool/method

Pure functions of the harness's row dicts; no model or tool is run here.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Sequence


def pareto_front(points: Iterable[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points (x = bits per weight, y = KLD, label) not dominated by another: lower-or-equal on both axes
    and strictly lower on one. NaN/None coordinates are dropped. Sorted by x."""
    pts = [(float(x), float(y), lab) for x, y, lab in points
           if x is not None and y is not None and not math.isnan(float(x)) and not math.isnan(float(y))]
    pts.sort(key=lambda p: (p[0], p[1]))
    front: list[tuple[float, float, str]] = []
    best = math.inf
    for x, y, lab in pts:
        if y < best:  # sorted by x then y: a point is on the front iff it beats every cheaper point
            front.append((x, y, lab))
            best = y
    return front


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


MARKERS = "osD^v<>pXh*"
COLOURS = [f"C{i}" for i in range(10)]  # matplotlib's default cycle (tab10)


def group_styles(groups: Iterable[str], fixed: dict[str, dict] | None = None) -> dict[str, dict]:
    """scatter() keyword arguments per legend group: a group in `fixed` keeps its own (e.g. a star in
    crimson), every other group gets, in sorted order, a marker and a colour that no fixed group and no
    earlier group uses (cycling only when they run out)."""
    fixed = fixed or {}
    taken_m = {st.get("marker") for st in fixed.values()}
    taken_c = {st.get("color") for st in fixed.values()}
    markers = [m for m in MARKERS if m not in taken_m] or list(MARKERS)
    colours = [c for c in COLOURS if c not in taken_c] or COLOURS
    out, i = {}, 0
    for g in sorted(set(groups)):
        if g in fixed:
            out[g] = dict(fixed[g])
        else:
            out[g] = {"marker": markers[i % len(markers)], "color": colours[i % len(colours)]}
            i += 1
    return out


def plot_kld_vs_bpw(rows: Sequence[dict], path: str | Path, title: str, styles: dict[str, dict] | None = None) -> Path | None:
    """rows: dicts with "label", "bpw", "kld" (llama.cpp mean KLD, > 0) and "group" (legend series);
    styles: group -> scatter() arguments for groups that must stand out (see group_styles).
    Returns the written path, or None when no row has both numbers."""
    pts = [r for r in rows if r.get("bpw") is not None and r.get("kld") is not None and r["kld"] > 0]
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    groups: dict[str, list[dict]] = {}
    for r in pts:
        groups.setdefault(r.get("group", ""), []).append(r)
    style = group_styles(groups, styles)
    for g, rs in sorted(groups.items()):
        ax.scatter([r["bpw"] for r in rs], [r["kld"] for r in rs], label=g, **{"zorder": 3, **style[g]})
        for r in rs:
            ax.annotate(r["label"], (r["bpw"], r["kld"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    front = pareto_front((r["bpw"], r["kld"], r["label"]) for r in pts)
    if len(front) > 1:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="grey", lw=1, ls="--",
                label="Pareto front", zorder=2)
    ax.set_yscale("log")
    return _finish(plt, fig, ax, "bits per weight (GGUF tensor data)", "mean KL divergence vs base (llama-perplexity)",
                   title, path)


def plot_ppl_vs_sparsity(rows: Sequence[dict], path: str | Path, title: str, dense_ppl: float | None = None) -> Path | None:
    """rows: dicts with "tool", "method", "pattern", "sparsity" (measured zeros fraction), "ppl"."""
    pts = [r for r in rows if r.get("sparsity") is not None and r.get("ppl") is not None]
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    series: dict[tuple[str, str, str], list[dict]] = {}
    for r in pts:
        kind = "N:M" if r.get("pattern", "unstructured") != "unstructured" else "unstructured"
        series.setdefault((r["tool"], r["method"], kind), []).append(r)
    for (tool, method, kind), rs in sorted(series.items()):
        rs = sorted(rs, key=lambda r: r["sparsity"])
        xs, ys = [r["sparsity"] for r in rs], [r["ppl"] for r in rs]
        if dense_ppl is not None and kind == "unstructured":
            xs, ys = [0.0] + xs, [dense_ppl] + ys
        # birdbone: large hollow circles, thick line; others: small filled squares, thin line -- equal
        # results (Wanda is deterministic) then show as a square inside a circle instead of hiding a series
        big = tool == "birdbone"
        ax.plot(xs, ys, marker="o" if big else "s", ms=10 if big else 4, fillstyle="none" if big else "full",
                lw=2.5 if big else 1, alpha=0.75 if big else 1, ls="-" if kind == "unstructured" else ":",
                label=f"{tool} {method} ({kind})")
        if kind != "unstructured":
            for r in rs:
                ax.annotate(r.get("pattern", ""), (r["sparsity"], r["ppl"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    if dense_ppl is not None:
        ax.axhline(dense_ppl, color="grey", lw=0.8, ls="--", label=f"dense {dense_ppl:.4g}")
    return _finish(plt, fig, ax, "sparsity of decoder linear weights (measured zeros)",
                   "perplexity (birdbone evaluator, held-out text)", title, path)


def _finish(plt, fig, ax, xlabel: str, ylabel: str, title: str, path: str | Path) -> Path:
    """Axis labels, title, grid and legend as every harness plot has them; write the PNG and close."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
