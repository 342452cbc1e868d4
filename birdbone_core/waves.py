"""Pruning in waves: prune a little more, heal, check the stop-loss, record the change, repeat.

Each wave k raises every target module to its cumulative sparsity s_k (usage statistics are re-collected
on the current, healed model), heals toward the dense model, measures validation perplexity, and asks
the stop-loss for a verdict. The ledger records every wave as a sparse delta; a rollback is recorded as
one more wave that returns the weights to the last accepted state, and the model ends there.
"""
from __future__ import annotations

import copy
import time

import torch
from safetensors.torch import load_file

from birdbone_core.data.text import calibration_blocks, read_text
from birdbone_core.eval.perplexity import evaluate
from birdbone_core.guard import stop_loss
from birdbone_core.heal import heal, healing_data
from birdbone_core.ledger import Ledger, state_of
from birdbone_core.progress import console
from birdbone_core.prune.sequential import count_zeros, prune_sequential
from birdbone_core.recipe import Recipe


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in state_of(model).items()}


def _wave_prune_cfg(recipe: Recipe, target: float):
    """The prune section for one wave: every sparsity scaled by target / final (overrides included)."""
    p = recipe.prune
    scale = target / p.sparsity if p.sparsity > 0 else 0.0
    return p.model_copy(update={"sparsity": target,
                                "layer_sparsity": {k: v * scale for k, v in p.layer_sparsity.items()}})


def run_waves(run, lm, recipe: Recipe) -> dict:
    """Prune `lm.model` in place to recipe.prune.sparsity in waves (see module doc). Needs the baseline
    step's token chunks (validation) in run.baseline_dir. Returns a summary for prune_report.json."""
    w = recipe.waves
    targets = w.targets(recipe.prune.sparsity)
    cal = recipe.calibration
    text, text_desc = read_text(cal.text, "calib")
    blocks = calibration_blocks(lm.tokenizer, text, cal.n_samples, cal.seq_len, cal.seed)
    hc = healing_data(w.heal, cal)
    heal_blocks = blocks if hc == cal else calibration_blocks(lm.tokenizer, text, hc.n_samples, hc.seq_len, hc.seed)
    ref = load_file(str(run.baseline_dir / "reference.safetensors"))
    chunks, ref_hidden = ref["chunks"], ref["hidden"]

    dense = copy.deepcopy(lm.model)                       # the teacher healing pulls toward
    ledger = Ledger(run.root)
    base_state = prev = _snapshot(lm.model)
    ledger.init_base(base_state, meta={"source": run.manifest()["model"]})
    base = evaluate(lm.model, chunks, reference_hidden=ref_hidden, description="validation (base)")[0]
    accepted_wave, accepted_ppl, strikes = 0, base.ppl, 0
    history = []
    t_start = time.perf_counter()
    for k, target in enumerate(targets, 1):
        t0 = time.perf_counter()
        prev_ppl = history[-1]["ppl_healed"] if history else base.ppl
        rep = prune_sequential(lm.model, blocks, _wave_prune_cfg(recipe, target),
                               description=f"wave {k}/{len(targets)}: {recipe.prune.method} to {target:.0%}")
        pruned = evaluate(lm.model, chunks, reference_hidden=ref_hidden, description=f"wave {k} pruned")[0]
        heal_rep = heal(lm.model, dense, heal_blocks, w.heal, k, len(targets), description=f"wave {k} healing")
        healed = evaluate(lm.model, chunks, reference_hidden=ref_hidden, description=f"wave {k} healed")[0]
        verdict = stop_loss(k, healed.ppl, accepted_wave, accepted_ppl, strikes,
                            w.stop_loss.threshold, w.stop_loss.patience)
        zeros, total = count_zeros(lm.model)
        lost = pruned.ppl - prev_ppl
        metrics = {"target": target, "sparsity": zeros / total, "ppl_pruned": pruned.ppl,
                   "ppl_healed": healed.ppl, "kld": healed.kld, "top1": healed.top1,
                   "healing_recovered": (pruned.ppl - healed.ppl) / lost if lost > 0 else None,
                   "seconds": time.perf_counter() - t0, "prune_seconds": rep.seconds,
                   "heal_curve": getattr(heal_rep, "curve", None) if heal_rep is not None else None}
        metrics = {m: v for m, v in metrics.items() if v is not None}
        new = _snapshot(lm.model)
        ledger.record_wave(k, prev, new, metrics=metrics, decision=f"{verdict.action}: {verdict.reason}")
        history.append({"wave": k, **metrics, "verdict": verdict.as_dict()})
        console().print(verdict.reason)
        prev = new
        accepted_wave, accepted_ppl, strikes = verdict.accepted_wave, verdict.accepted_ppl, verdict.strikes
        if verdict.action == "rollback":
            entry = ledger.revert_marker(accepted_wave, metrics={"ppl": accepted_ppl},
                                         decision=f"rollback to wave {accepted_wave}")
            lm.model.load_state_dict(ledger.state_at(entry.wave, base_state), strict=True)
            history.append({"wave": entry.wave, "rollback_to": accepted_wave, "ppl": accepted_ppl})
            break
    zeros, total = count_zeros(lm.model)
    return {"mode": "waves", "method": recipe.prune.method, "pattern": recipe.prune.pattern,
            "targets": targets, "sparsity": zeros / total, "seconds": time.perf_counter() - t_start,
            "base_ppl": base.ppl, "accepted_wave": accepted_wave, "waves": history,
            "calibration": {"text": text_desc, "n_samples": cal.n_samples, "seq_len": cal.seq_len,
                            "seed": cal.seed}}
