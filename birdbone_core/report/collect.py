"""Collect one run's numbers for the report: whatever the run directory holds, from wherever it holds it.

Sources, later ones filling in what earlier ones lack (a run still in progress has no prune_report.json,
a one-shot run has no waves, an old run has no RUN/waves/):

    RUN/run.json, RUN/recipe.yaml      model, recipe name, stop-loss threshold/patience, steps done
    RUN/ledger/                        per wave: metrics, decision "<action>: <reason>", per-tensor zeros
    RUN/waves/K/*.json                 per wave: decision.json (the step contract) and any file carrying a
                                       healing curve (heal.json; see `heal_curves` for the forms)
    RUN/rollback.json, RUN/prepare/prepare.json   the rollback step's record, the dense ppl
    RUN/prune_report.json              the wave history as the loop wrote it at the end; fills in what the
                                       others lack (verdicts and reasons: the ledger's and decision.json's
                                       words win, they carry the final reason)
    RUN/metrics.json                   final base vs compressed (size, ppl, KLD, top-1)

Everything is read as plain JSON/YAML (not through the recipe models) so that a report can be written for
a run made by an older or newer birdbone. Files that exist but do not parse are user errors (atomic
writes never leave half a file); files that do not exist are listed in `RunData.missing`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from birdbone_core.errors import BirdboneError
from birdbone_core.report import prune_report
from birdbone_core.report.data import (
    LAYER_RE,
    WAVE_METRICS,
    LedgerWave,
    Rollback,
    RunData,
    WaveRow,
    heal_curves,
    num,
    split_decision,
    verdict_name,
)


def _read_json(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BirdboneError(f"{path}: not valid JSON ({getattr(e, 'msg', e)})") from None


def _apply_metrics(row: WaveRow, m: dict) -> None:
    for k in WAVE_METRICS:
        v = num(m.get(k))
        if v is not None:                      # NaN/Inf ppl included: the stop-loss saw it
            setattr(row, k, v)
    curves = heal_curves({k: m[k] for k in ("heal_curve", "heal") if k in m})
    if curves:
        row.heal_curves = curves
    if isinstance(m.get("heal"), dict):
        row.heal = {k: v for k, v in m["heal"].items() if not isinstance(v, (list, dict))}
    if num(m.get("heal_seconds")) is not None:
        row.heal["seconds"] = num(m["heal_seconds"])


def _ledger_waves(root: Path, data: RunData) -> None:
    from birdbone_core.ledger import Ledger

    ledger = Ledger(root)
    if not ledger.exists():
        data.missing.append("no ledger (RUN/ledger/): per-layer sparsity and per-wave records are unavailable")
        return
    zeros: dict[str, tuple[int, int, tuple]] = {}          # name -> (zeros, numel, shape) after the wave
    for e in ledger.log():
        for n, r in e.tensors.items():
            zeros[n] = (r.zeros, r.numel, r.shape)
        per_layer: dict[int, list[int]] = {}
        per_module: dict[tuple[int, str], list[int]] = {}
        for n, (z, numel, shape) in zeros.items():
            m = LAYER_RE.search(n)
            if m is None or len(shape) != 2:              # only the decoder layers' matrices are pruned
                continue
            layer = int(m.group(1))
            kind = n[m.end():].removesuffix(".weight").split(".")[-1]
            for acc, key in ((per_layer, layer), (per_module, (layer, kind))):
                a = acc.setdefault(key, [0, 0])
                a[0] += z
                a[1] += numel
        data.ledger.append(LedgerWave(
            wave=e.wave, kind=e.kind, decision=e.decision, reverts_to=e.reverts_to, sparsity=e.sparsity,
            changed=e.changed,
            linear_sparsity=(sum(z for z, _ in per_layer.values()) / max(sum(t for _, t in per_layer.values()), 1)
                             if per_layer else None),
            layer_sparsity={k: z / max(t, 1) for k, (z, t) in sorted(per_layer.items())},
            module_sparsity={k: z / max(t, 1) for k, (z, t) in sorted(per_module.items())}))
        if e.kind == "wave":
            row = data.wave(e.wave)
            _apply_metrics(row, e.metrics)
            action, reason = split_decision(e.decision)
            row.action, row.reason = action or row.action, reason or row.reason
            if row.sparsity is None and "linear_sparsity" in e.metrics:
                row.sparsity = num(e.metrics["linear_sparsity"])
        elif e.kind == "revert":
            data.rollbacks.append(Rollback(wave=e.wave, rollback_to=int(e.reverts_to or 0),
                                           ppl=num(e.metrics.get("ppl")), reason=e.decision))


def _wave_dirs(root: Path, data: RunData) -> None:
    """RUN/waves/<K>/: decision.json (contract) and any JSON that carries a healing curve."""
    wdir = root / "waves"
    if not wdir.is_dir():
        return
    for d in sorted(wdir.iterdir()):
        digits = d.name.lstrip("wave-_")
        if not d.is_dir() or not digits.isdigit():
            continue
        k = int(digits)
        order = {"prune": 0, "heal": 1, "regrow": 2, "evaluate": 3, "decision": 4}
        data.wave_steps[k] = sorted((f.stem for f in d.glob("*.json")), key=lambda n: (order.get(n, 5), n))
        for f in sorted(d.rglob("*.json"))[:64]:
            obj = _read_json(f)
            if not isinstance(obj, dict):
                continue
            if f.name == "decision.json":
                if int(obj.get("wave", k)) != k or obj.get("action") is None:
                    continue
                row = data.wave(k)
                row.action = verdict_name(obj.get("verdict")) or row.action
                row.reason = obj.get("reason") or row.reason
                row.next_step = obj.get("action")
                row.accepted_ppl = num(obj.get("accepted_ppl")) or row.accepted_ppl
                m = obj.get("metrics") or {}
                if row.ppl_healed is None and num(m.get("ppl")) is not None:
                    row.ppl_healed = num(m.get("ppl"))
                if row.sparsity is None and num(m.get("sparsity")) is not None:
                    row.sparsity = num(m.get("sparsity"))
                if obj.get("accepted_wave") is not None:
                    data.accepted_wave = int(obj["accepted_wave"])
            else:
                _step_record(data.wave(k), f.stem, obj)


def _step_record(row: WaveRow, step: str, rec: dict) -> None:
    """A wave step's own record (RUN/waves/K/<step>.json): the numbers of a wave not yet decided (once
    decided, the ledger holds them). Only fills what the row lacks."""
    fill = {"prune": {"target": "target", "sparsity": "sparsity", "ppl_pruned": "ppl_pruned",
                      "prune_seconds": "prune_seconds"},
            "evaluate": {"ppl_healed": "ppl", "kld": "kld", "top1": "top1", "sparsity": "sparsity"}}.get(step, {})
    for attr, key in fill.items():
        if getattr(row, attr) is None and num(rec.get(key)) is not None:
            setattr(row, attr, num(rec[key]))
    if not row.heal_curves:
        row.heal_curves = heal_curves(rec)
    if step == "heal" and not row.heal and isinstance(rec.get("report"), dict):
        summary = {k: rec[k] for k in ("method", "steps", "lr") if k in rec}
        summary.update({k: v for k, v in rec["report"].items()
                        if k in ("loss_before", "loss_after", "kl_before", "kl_after")})
        if num(rec.get("seconds")) is not None:
            summary["seconds"] = num(rec["seconds"])
        row.heal = summary


def _rollback_marker(root: Path, data: RunData) -> None:
    """RUN/rollback.json (the loop's `rollback` step): the ledger wave, target and the reason."""
    rb = _read_json(root / "rollback.json")
    if not isinstance(rb, dict) or "ledger_wave" not in rb:
        return
    have = next((r for r in data.rollbacks if r.wave == int(rb["ledger_wave"])), None)
    if have is None:
        have = Rollback(wave=int(rb["ledger_wave"]), rollback_to=int(rb.get("to_wave", 0)))
        data.rollbacks.append(have)
    have.ppl = have.ppl if have.ppl is not None else num(rb.get("ppl"))
    if rb.get("after_wave") is not None:
        have.reason = f"as wave {rb['after_wave']} decided"
    g = rb.get("gradual")
    if isinstance(g, dict):   # gradual rollback (loop/ends.py): the kept stage and every measured stage
        parts = [f"stage {r.get('stage')}: {_pct0(r.get('fraction_restored'))} restored, sparsity "
                 f"{_pct0(r.get('sparsity'), 1)}, ppl {_num3(r.get('ppl'))}" + (" (kept)" if r.get("kept") else "")
                 for r in g.get("evaluated") or [] if isinstance(r, dict)]
        have.reason = (f"gradual, stage {g.get('kept_stage')}/{g.get('stages')} kept"
                       + (f" ({'; '.join(parts)})" if parts else "") + (f", {have.reason}" if have.reason else ""))


def _pct0(x, digits: int = 0) -> str:
    return f"{x:.{digits}%}" if isinstance(x, (int, float)) else "?"


def _num3(x) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else "non-finite"


def _prune_report(root: Path, data: RunData) -> None:
    rep = _read_json(root / prune_report.FILE)
    if rep is None:
        data.missing.append("no prune_report.json (the pruning step has not finished)")
        return
    mode = rep.get("mode", "waves" if "waves" in rep else "one-shot")
    data.mode = "waves" if mode == "waves" else "one-shot"
    data.method, data.pattern = rep.get("method", data.method), rep.get("pattern", data.pattern)
    data.targets = [float(t) for t in rep.get("targets") or []] or data.targets
    data.base_ppl = num(rep.get("base_ppl")) or data.base_ppl
    data.final_sparsity = num(rep.get("sparsity"))
    data.prune_seconds = num(rep.get("seconds"))
    if rep.get("accepted_wave") is not None:
        data.accepted_wave = int(rep["accepted_wave"])
    for h in rep.get("waves") or []:
        if not isinstance(h, dict) or "wave" not in h:
            continue
        if "rollback_to" in h:
            rb = next((r for r in data.rollbacks if r.wave == h["wave"]), None)
            if rb is None:
                data.rollbacks.append(Rollback(wave=int(h["wave"]), rollback_to=int(h["rollback_to"]),
                                               ppl=num(h.get("ppl"))))
            elif rb.ppl is None:
                rb.ppl = num(h.get("ppl"))
            continue
        row = data.wave(int(h["wave"]))
        _apply_metrics(row, h)
        v = h.get("verdict")
        if isinstance(v, dict):   # the ledger's / decision.json's words win: they carry the final reason
            row.action = row.action or verdict_name(v.get("action"))
            row.reason = row.reason or v.get("reason")
            row.accepted_ppl = num(v.get("accepted_ppl")) or row.accepted_ppl
        if isinstance(h.get("action"), str):
            row.next_step = row.next_step or h["action"]
    if data.mode == "one-shot" and not data.waves:
        row = data.wave(1)
        row.sparsity = data.final_sparsity
        row.seconds = data.prune_seconds


def _oneshot_metrics(data: RunData) -> None:
    """A one-shot run measures its only pruned state once, in the final evaluate step: when the final state
    is ledger wave 1 (no rollback), metrics.json's compressed numbers are wave 1's."""
    m = data.metrics
    if (data.mode != "one-shot" or len(data.waves) != 1 or data.rollbacks or not isinstance(m, dict)
            or not data.ledger or data.ledger[-1].wave != 1):
        return
    c, row = m.get("compressed") or {}, data.waves[0]
    for attr, key in (("ppl_pruned", "ppl"), ("kld", "kld"), ("top1", "top1"), ("sparsity", "sparsity")):
        if getattr(row, attr) is None and num(c.get(key)) is not None:
            setattr(row, attr, num(c[key]))


def _recipe_targets(raw: dict, path: Path) -> list[float]:
    """The waves' cumulative targets as the loop computes them, when this birdbone can read the recipe."""
    from pydantic import ValidationError

    from birdbone_core.recipe import parse_recipe

    try:
        r = parse_recipe(raw, str(path))
    except (BirdboneError, ValidationError, TypeError, ValueError):
        return []                        # a recipe from another version: prune_report.json may still say
    return r.waves.targets(r.prune.sparsity) if r.waves is not None else [r.prune.sparsity]


def collect(root: Path) -> RunData:
    """Everything the run directory `root` holds that the report uses (see the module doc)."""
    root = Path(root)
    manifest = _read_json(root / "run.json")
    if not isinstance(manifest, dict):
        raise BirdboneError(f"{root}: not a birdbone run directory (no run.json); create it with `birdbone init`")
    data = RunData(root=root, name=os.environ.get("BIRDBONE_RUN_ID") or root.resolve().name)
    model = manifest.get("model") or {}
    data.model = model.get("spec") if model.get("spec") not in (None, "default") else model.get("path")
    data.recipe_name = manifest.get("recipe_name")
    steps = manifest.get("steps") or {}
    data.steps_done = list(steps)
    prune_info = steps.get("prune") or {}
    data.method, data.pattern = prune_info.get("method"), prune_info.get("pattern")
    data.base_ppl = num((steps.get("baseline") or steps.get("prepare") or {}).get("ppl"))

    recipe_path = root / "recipe.yaml"
    if recipe_path.is_file():
        try:
            recipe = yaml.safe_load(recipe_path.read_text()) or {}
        except yaml.YAMLError as e:
            raise BirdboneError(f"{recipe_path}: not valid YAML ({e})") from None
        prune = recipe.get("prune") or {}
        data.method = data.method or prune.get("method")
        data.pattern = data.pattern or prune.get("pattern")
        waves = recipe.get("waves")
        data.targets = _recipe_targets(recipe, recipe_path)
        if isinstance(waves, dict):
            data.mode = "waves"
            sl = waves.get("stop_loss") or {}
            data.heal_method = (waves.get("heal") or {}).get("method", "blockwise")
            data.threshold, data.patience = num(sl.get("threshold", 0.03)), sl.get("patience", 2)
        elif recipe:
            data.mode = "one-shot"

    _ledger_waves(root, data)
    _wave_dirs(root, data)
    _rollback_marker(root, data)
    _prune_report(root, data)
    for f in ("prepare/prepare.json", "baseline/eval.json"):
        rec = _read_json(root / f)
        if data.base_ppl is None and isinstance(rec, dict):
            data.base_ppl = num(rec.get("base_ppl", rec.get("ppl")))
    if data.base_ppl is None:
        data.missing.append("no baseline perplexity (the baseline/prepare step has not run)")
    data.metrics = _read_json(root / "metrics.json")
    if data.metrics is None:
        data.missing.append("no metrics.json (the final evaluate step has not run)")
    if data.mode == "waves" and data.waves and not data.has_curves:
        data.missing.append("no healing loss curves: the recipe turns healing off (heal.method: none)"
                            if data.heal_method == "none" else "no healing loss curves recorded for any wave")
    _oneshot_metrics(data)
    for w in data.waves:
        if w.action is None and data.mode == "waves":
            data.missing.append(f"wave {w.wave}: no stop-loss decision recorded yet")
    if data.final_sparsity is None and data.ledger and data.ledger[-1].kind != "base":
        data.final_sparsity = data.ledger[-1].linear_sparsity
        data.sparsity_at = f"ledger wave {data.ledger[-1].wave}"
    return data
