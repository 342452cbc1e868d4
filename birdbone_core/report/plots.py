"""The report's figures, drawn with matplotlib's object API on the Agg canvas (no pyplot, no display,
no global state). Each function takes a RunData and a path, writes one PNG and returns True, or returns
False without writing when the run has nothing to draw for it (the report then says what is missing).
"""
from __future__ import annotations

import math
from pathlib import Path

from birdbone_core.report.data import RunData, pct_limit

DPI = 100
VERDICT_COLORS = {"accept": "tab:green", "strike": "tab:orange", "rollback": "tab:red", None: "tab:gray"}


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> bool:
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    return True


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def _wave_axis_labels(ax, data: RunData, waves: list[int]) -> None:
    """x ticks: wave number with the sparsity reached (or aimed for) under it."""
    labels = []
    for k in waves:
        if k == 0:
            labels.append("0\nbase")
            continue
        rb = next((r for r in data.rollbacks if r.wave == k), None)
        if rb is not None:
            labels.append(f"{k}\n↩ {rb.rollback_to}")
            continue
        w = data.find(k)
        s = None if w is None else w.sparsity if w.sparsity is not None else w.target
        labels.append(f"{k}\n{s:.0%}" if s is not None else str(k))
    ax.set_xticks(waves, labels)
    ax.set_xlabel("wave (sparsity of pruned modules)")


def accepted_limits(data: RunData) -> list[tuple[int, float, float]]:
    """Per wave k: (k, ppl of the last accepted state before k, the stop-loss limit it was judged by),
    replaying the stop-loss's bookkeeping from the recorded verdicts."""
    if data.base_ppl is None or data.threshold is None:
        return []
    out, accepted = [], data.base_ppl
    for w in sorted(data.waves, key=lambda r: r.wave):
        out.append((w.wave, accepted, accepted * (1 + data.threshold)))
        if w.accepted_ppl is not None:
            accepted = w.accepted_ppl
        elif w.action == "accept" and _finite(w.ppl):
            accepted = w.ppl
    return out


def plot_ppl(data: RunData, path: Path) -> bool:
    """Validation perplexity per wave: after pruning (x) and after healing (o, coloured by verdict), the
    stop-loss band (last accepted ppl .. limit) and rollback markers."""
    rows = [w for w in data.waves if _finite(w.ppl_pruned) or _finite(w.ppl_healed)]
    if not rows:
        return False
    fig = _figure(7.5, 4.2)
    ax = fig.add_subplot()
    xs = [w.wave for w in rows]
    if data.base_ppl is not None:                    # wave 0: the dense model, where every run starts
        ax.axhline(data.base_ppl, color="black", lw=0.8, ls=":", label=f"dense {data.base_ppl:.3f}")
        ax.scatter([0], [data.base_ppl], s=46, color="black", zorder=3)
    band = accepted_limits(data)
    if band:
        bx = [k for k, _, _ in band]
        ax.fill_between(bx, [a for _, a, _ in band], [lim for _, _, lim in band], step="mid",
                        color="tab:orange", alpha=0.18, lw=0,
                        label=f"stop-loss band ({pct_limit(data.threshold)} over last accepted)")
    pr = [(w.wave, w.ppl_pruned) for w in rows if _finite(w.ppl_pruned)]
    he = [(w.wave, w.ppl_healed) for w in rows if _finite(w.ppl_healed)]
    start = [(0, data.base_ppl)] if data.base_ppl is not None else []
    if pr:
        ax.plot(*zip(*pr), "x--", color="tab:purple", label="after pruning")
    if he and he != pr:
        ax.plot(*zip(*(start + he)), "-", color="tab:blue", lw=1, label="after healing")
    for w in rows:                                   # one marker per verdict, pruned -> healed arrows
        if _finite(w.ppl_healed):
            ax.scatter([w.wave], [w.ppl_healed], s=46, zorder=3, color=VERDICT_COLORS.get(w.action, "tab:gray"),
                       edgecolor="black", lw=0.5)
        if _finite(w.ppl_pruned) and _finite(w.ppl_healed) and w.ppl_pruned != w.ppl_healed:
            ax.annotate("", (w.wave, w.ppl_healed), (w.wave, w.ppl_pruned),
                        arrowprops={"arrowstyle": "->", "color": "tab:gray", "lw": 0.8})
    for v in ("accept", "strike", "rollback"):
        if any(w.action == v for w in rows):
            ax.scatter([], [], s=46, color=VERDICT_COLORS[v], edgecolor="black", lw=0.5, label=v)
    for rb in data.rollbacks:
        x = rb.wave - 0.5
        ax.axvline(x, color="tab:red", lw=1.2, ls="--")
        ax.text(x, 0.98, f" rollback → wave {rb.rollback_to}", color="tab:red", rotation=90, va="top",
                ha="right", fontsize=8, transform=ax.get_xaxis_transform())
        if _finite(rb.ppl):
            ax.scatter([rb.wave], [rb.ppl], marker="D", s=40, color="tab:red", zorder=3)
            ax.annotate(f"restored {rb.ppl:.3f}", (rb.wave, rb.ppl), xytext=(4, -12),
                        textcoords="offset points", fontsize=8, color="tab:red")
    vals = [v for _, v in pr + he] + ([data.base_ppl] if data.base_ppl else [])
    if vals and min(vals) > 0 and max(vals) / min(vals) > 20:
        ax.set_yscale("log")
    waves = sorted(set(xs) | {rb.wave for rb in data.rollbacks} | ({0} if start else set()))
    _wave_axis_labels(ax, data, waves)
    ax.set_xlim(waves[0] - 0.4, waves[-1] + (0.9 if data.rollbacks else 0.4))
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"{data.name}: perplexity per wave")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_heal_curves(data: RunData, path: Path) -> bool:
    """Healing loss vs step, one panel per wave; one line per decoder layer (block-wise) or one line
    (distillation). Log scale: per-layer losses differ by orders of magnitude."""
    rows = [w for w in data.waves if w.heal_curves]
    if not rows:
        return False
    ncol = min(len(rows), 3)
    nrow = math.ceil(len(rows) / ncol)
    fig = _figure(3.6 * ncol + 0.6, 2.8 * nrow + 0.4)
    axes = fig.subplots(nrow, ncol, squeeze=False)
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    for i, w in enumerate(rows):
        ax = axes[i // ncol][i % ncol]
        n = len(w.heal_curves)
        positive = all(v > 0 for c in w.heal_curves.values() for v in c)
        for j, (label, curve) in enumerate(w.heal_curves.items()):
            ax.plot(range(1, len(curve) + 1), curve, lw=1.1, label=label,
                    color=cmap(j / max(n - 1, 1)) if n > 1 else "tab:blue")
        if positive:
            ax.set_yscale("log")
        ax.set_title(f"wave {w.wave}" + (f" ({w.action})" if w.action else ""), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("loss", fontsize=8)
        ax.grid(alpha=0.3)
        if n <= 8:
            ax.legend(fontsize=6)
        else:                                        # 18+ layers: a legend would hide the curves
            ax.text(0.99, 0.99, f"layer 0 (dark) … {n - 1} (light)", transform=ax.transAxes, fontsize=6,
                    ha="right", va="top")
    for j in range(len(rows), nrow * ncol):
        axes[j // ncol][j % ncol].set_visible(False)
    fig.suptitle(f"{data.name}: healing loss per step")
    return _save(fig, path)


def _heal_before_after(w) -> tuple[float | None, float | None, str]:
    h = w.heal
    if "loss_before" in h:
        return h.get("loss_before"), h.get("loss_after"), "reconstruction loss (mean over layers)"
    return h.get("kl_before"), h.get("kl_after"), "top-k KL to the dense model"


def plot_heal_per_wave(data: RunData, path: Path) -> bool:
    """Healing loss per wave: before and after each wave's healing, on the healing data."""
    pts = [(w.wave, *_heal_before_after(w)) for w in data.waves if w.heal.get("method")]
    pts = [p for p in pts if _finite(p[1]) and _finite(p[2])]
    if not pts:
        return False
    fig = _figure(6.5, 3.4)
    ax = fig.add_subplot()
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "x--", color="tab:purple", label="before healing")
    ax.plot([p[0] for p in pts], [p[2] for p in pts], "o-", color="tab:blue", label="after healing")
    if all(v > 0 for p in pts for v in p[1:3]):
        ax.set_yscale("log")
    _wave_axis_labels(ax, data, [p[0] for p in pts])
    ax.set_ylabel(pts[0][3], fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"{data.name}: healing loss per wave")
    return _save(fig, path)


def plot_sparsity(data: RunData, path: Path) -> bool:
    """Per-layer sparsity from the ledger: layer x wave heatmap (every recorded state), and layer x module
    of the last recorded state."""
    states = [e for e in data.ledger if e.layer_sparsity]
    if not states or all(e.kind == "base" for e in states):
        return False
    layers = sorted({k for e in states for k in e.layer_sparsity})
    last = states[-1]
    kinds = sorted({k for _, k in last.module_sparsity})
    fig = _figure(max(7.5, 1.0 + 0.55 * (len(states) + len(kinds))), 1.6 + 0.3 * len(layers))
    a1, a2 = fig.subplots(1, 2, width_ratios=[max(len(states), 2), max(len(kinds), 2)])
    grid = [[e.layer_sparsity.get(i, float("nan")) for e in states] for i in layers]
    im = a1.imshow(grid, aspect="auto", cmap="magma_r", vmin=0, vmax=1, origin="upper")
    a1.set_xticks(range(len(states)), [f"{e.wave}" + ("↩" if e.kind == "revert" else "") for e in states])
    a1.set_yticks(range(len(layers)), [str(i) for i in layers])
    a1.set_xlabel("ledger wave (↩ = rollback)")
    a1.set_ylabel("decoder layer")
    a1.set_title("zeros per layer after each wave", fontsize=9)
    grid2 = [[last.module_sparsity.get((i, k), float("nan")) for k in kinds] for i in layers]
    a2.imshow(grid2, aspect="auto", cmap="magma_r", vmin=0, vmax=1, origin="upper")
    a2.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right", fontsize=8)
    a2.set_yticks(range(len(layers)), [str(i) for i in layers])
    a2.set_title(f"per module, wave {last.wave}", fontsize=9)
    small = len(layers) <= 40
    for ax, g in ((a1, grid), (a2, grid2)):
        if small and len(g[0]) <= 16:
            for r, row in enumerate(g):
                for c, v in enumerate(row):
                    if _finite(v):
                        ax.text(c, r, f"{v:.0%}", ha="center", va="center", fontsize=6,
                                color="white" if v > 0.55 else "black")
    fig.colorbar(im, ax=[a1, a2], shrink=0.8, label="sparsity")
    fig.suptitle(f"{data.name}: sparsity per layer")
    return _save(fig, path)


def plot_kld_top1(data: RunData, path: Path) -> bool:
    """KL divergence to the dense model and top-1 agreement per wave (after healing)."""
    rows = [w for w in data.waves if _finite(w.kld) or _finite(w.top1)]
    if not rows:
        return False
    fig = _figure(7.0, 3.6)
    ax = fig.add_subplot()
    k = [(w.wave, w.kld) for w in rows if _finite(w.kld)]
    t = [(w.wave, w.top1) for w in rows if _finite(w.top1)]
    lines = []
    if k:
        lines += ax.plot(*zip(*k), "o-", color="tab:red", label="KLD vs dense")
    ax.set_ylabel("KL divergence (nats/token)")
    ax.grid(alpha=0.3)
    if t:
        ax2 = ax.twinx()
        lines += ax2.plot(*zip(*t), "s--", color="tab:blue", label="top-1 agreement")
        ax2.set_ylabel("top-1 agreement")
        ax2.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    for rb in data.rollbacks:
        ax.axvline(rb.wave - 0.5, color="tab:red", lw=1.2, ls="--")
    _wave_axis_labels(ax, data, [w.wave for w in rows])
    fig.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="outside lower center", ncols=2)
    ax.set_title(f"{data.name}: divergence from the dense model per wave")
    return _save(fig, path)


FIGURES = (
    ("ppl_per_wave.png", plot_ppl, "Validation perplexity per wave, after pruning and after healing"),
    ("healing_loss.png", plot_heal_curves, "Healing loss per step, one panel per wave"),
    ("healing_per_wave.png", plot_heal_per_wave, "Healing loss per wave, before and after healing"),
    ("sparsity_per_layer.png", plot_sparsity, "Sparsity per decoder layer after each wave, and per module"),
    ("kld_top1.png", plot_kld_top1, "KL divergence and top-1 agreement with the dense model per wave"),
)
