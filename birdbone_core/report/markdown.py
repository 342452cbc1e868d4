"""report.md: the run's story in tables (setup, result, every wave, every decision with its reason, per-layer
sparsity, the ledger), with the figures linked beside it and a list of what the run does not (yet) have."""
from __future__ import annotations

import math
from pathlib import Path

from birdbone_core.report.data import RunData, pct_limit
from birdbone_core.report.plots import accepted_limits


def _cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _f(v, fmt: str = ".3f") -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, fmt)


def _pct(v, digits: int = 1) -> str:
    return _f(v, f".{digits}%")


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return out + [""]


def _setup(d: RunData) -> list[str]:
    prune = " ".join(x for x in (d.method, d.pattern) if x) or "–"
    if d.mode == "waves":
        prune += f", in {len(d.targets)} waves" if d.targets else ", in waves"
        if d.targets:
            prune += " (" + ", ".join(f"{t:.0%}" for t in d.targets) + ")"
    elif d.mode == "one-shot":
        prune += ", one shot"
    rows = [["model", d.model or "–"], ["recipe", d.recipe_name or "–"], ["pruning", prune]]
    if d.threshold is not None:
        rows.append(["stop-loss", f"perplexity more than {pct_limit(d.threshold)} over the last accepted state "
                                  f"for {d.patience} waves in a row → roll back"])
    rows.append(["dense perplexity", _f(d.base_ppl)])
    if d.accepted_wave is not None:
        rows.append(["accepted wave", str(d.accepted_wave)])
    if d.final_sparsity is not None:
        rows.append([f"zeros in pruned modules ({d.sparsity_at})", _pct(d.final_sparsity)])
    if d.prune_seconds is not None:
        rows.append(["pruning wall time", f"{d.prune_seconds:.1f} s"])
    rows.append(["steps done", ", ".join(d.steps_done) or "none"])
    for k, steps in sorted(d.wave_steps.items()):
        rows.append([f"wave {k} steps done", ", ".join("decide" if s == "decision" else s for s in steps) or "none"])
    return _table(["", ""], rows)


def _result(d: RunData) -> list[str]:
    m = d.metrics
    if not isinstance(m, dict) or "base" not in m or "compressed" not in m:
        return ["Not evaluated yet (no metrics.json).", ""]
    b, c = m["base"], m["compressed"]
    mb = lambda n: "–" if n is None else f"{n / 2**20:,.1f}"  # noqa: E731
    lines = [f"{m.get('n_scored', '?')} held-out tokens of {m.get('eval_text', '?')}, n_ctx {m.get('n_ctx', '?')}.", ""]
    lines += _table(
        ["model", "file", "size MB", "zeros", "ppl (torch)", "ppl (llama.cpp)", "KLD vs base", "top-1 agree"],
        [["base", Path(b.get("path") or "–").name, mb(b.get("bytes")), "–", _f(b.get("ppl")),
          _f(b.get("ppl_llamacpp")), "0", "100%"],
         ["compressed", Path(c.get("path") or "–").name, mb(c.get("bytes")), _pct(c.get("sparsity")),
          _f(c.get("ppl")), _f(c.get("ppl_llamacpp")), _f(c.get("kld"), ".4f"), _pct(c.get("top1"))]])
    return lines


def _waves(d: RunData) -> list[str]:
    if not d.waves and not d.rollbacks:
        return ["No wave recorded yet.", ""]
    judged = {k: acc for k, acc, _ in accepted_limits(d)}
    rows = []
    for w in d.waves:
        acc = judged.get(w.wave)
        p = w.ppl_healed                     # what the stop-loss judges (after healing and regrowth)
        vs = f"{p / acc - 1:+.1%} vs {_f(acc)}" if acc and p is not None and math.isfinite(p) else "–"
        rows.append([str(w.wave), _pct(w.target, 0), _pct(w.sparsity), _f(w.ppl_pruned), _f(w.ppl_healed), vs,
                     _pct(w.healing_recovered, 0), _f(w.kld, ".4f"), _pct(w.top1), _f(w.seconds, ".1f"),
                     w.action or "–"])
    for rb in d.rollbacks:
        rows.append([f"{rb.wave} ↩", "", "", "", _f(rb.ppl), "", "", "", "", "",
                     f"rollback to wave {rb.rollback_to}"])
    rows.sort(key=lambda r: int(r[0].split()[0]))
    return _table(["wave", "target", "zeros", "ppl pruned", "ppl healed", "vs last accepted", "healing recovered",
                   "KLD", "top-1", "time s", "verdict"], rows) + [
        "*healing recovered*: the share of the wave's perplexity rise (pruned vs the previous wave) that "
        "healing won back; negative when healing made it worse.", ""]


def _decisions(d: RunData) -> list[str]:
    items = []
    for w in d.waves:
        if w.action is None and d.mode == "one-shot":
            items.append((w.wave, f"- **wave {w.wave}** (one shot, no stop-loss): {_cell(w.reason or '–')}"))
        elif w.action or w.reason:
            nxt = f" → {w.next_step}" if w.next_step else ""
            items.append((w.wave, f"- **wave {w.wave}: {w.action or 'no verdict'}**{nxt}: "
                                  f"{_cell(w.reason or 'no reason recorded')}"))
        else:
            items.append((w.wave, f"- **wave {w.wave}**: not decided yet"))
    for rb in d.rollbacks:
        items.append((rb.wave, f"- **wave {rb.wave}: rollback** to wave {rb.rollback_to}"
                               + (f" (perplexity back to {_f(rb.ppl)})" if rb.ppl is not None else "")
                               + (f": {_cell(rb.reason)}" if rb.reason else "")))
    return [line for _, line in sorted(items)] + [""] if items else ["No decisions recorded yet.", ""]


def _healing(d: RunData) -> list[str]:
    rows = []
    for w in d.waves:
        h = w.heal
        if not h.get("method"):
            continue
        before, after = (h.get("loss_before"), h.get("loss_after")) if "loss_before" in h else \
            (h.get("kl_before"), h.get("kl_after"))
        change = (f"{after / before - 1:+.1%}" if isinstance(before, (int, float)) and before
                  and isinstance(after, (int, float)) else "–")
        rows.append([str(w.wave), h.get("method", "–"), str(h.get("steps", "–")), _f(h.get("lr"), ".2g"),
                     _f(before, ".4g"), _f(after, ".4g"), change, _f(h.get("seconds"), ".1f")])
    if not rows:
        return []
    return ["## Healing", "", "Loss on the healing data before and after each wave's healing (block-wise: "
            "reconstruction loss averaged over layers; distillation: top-k KL to the dense model).", ""] + _table(
        ["wave", "method", "steps", "lr", "loss before", "loss after", "change", "time s"], rows)


def _layers(d: RunData) -> list[str]:
    last = next((e for e in reversed(d.ledger) if e.layer_sparsity), None)
    if last is None or last.kind == "base":
        return ["No pruned state in the ledger yet.", ""]
    kinds = sorted({k for _, k in last.module_sparsity})
    rows = [[str(i), _pct(s)] + [_pct(last.module_sparsity.get((i, k))) for k in kinds]
            for i, s in last.layer_sparsity.items()]
    return [f"After ledger wave {last.wave} ({last.kind}):", ""] + _table(["layer", "all"] + kinds, rows)


def _ledger(d: RunData) -> list[str]:
    if not d.ledger:
        return ["No ledger.", ""]
    rows = [[str(e.wave), e.kind if e.reverts_to is None else f"revert → {e.reverts_to}", _pct(e.sparsity, 2),
             _pct(e.linear_sparsity, 2), "–" if e.kind == "base" else f"{e.changed:,}", e.decision or "–"]
            for e in d.ledger]
    return _table(["wave", "kind", "zeros (all tensors)", "zeros (layer matrices)", "elements changed",
                   "decision"], rows)


def render(d: RunData, figures: list[tuple[str, str, bool]]) -> str:
    """The Markdown text. figures: (file name, caption, drawn?) in order."""
    out = [f"# Run report: {_cell(d.name)}", ""]
    out += _setup(d)
    out += ["## Result", ""] + _result(d)
    out += ["## Waves", ""] + _waves(d)
    out += ["## Decisions", ""] + _decisions(d)
    out += _healing(d)
    out += ["## Figures", ""]
    for name, caption, drawn in figures:
        out += [f"![{caption}]({name})", "", f"*{caption}.*", ""] if drawn else [f"*{caption}: nothing to draw.*", ""]
    out += ["## Sparsity per layer", ""] + _layers(d)
    out += ["## Ledger", ""] + _ledger(d)
    out += ["## Missing", ""]
    out += [f"- {m}" for m in d.missing] if d.missing else ["Nothing: every source the report reads was present."]
    return "\n".join(out).rstrip() + "\n"
