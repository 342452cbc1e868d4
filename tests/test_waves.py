"""Pruning in waves on the fixture: healing after each wave, the stop-loss, and the ledger."""
import json

import torch
from safetensors.torch import load_file

from birdbone_core.compress import compress
from birdbone_core.ledger import Ledger, tensor_hash

RECIPE = """
name: waves
calibration: {{n_samples: 16, seq_len: 128}}
evaluation: {{n_ctx: 128, max_chunks: 8}}
prune: {{method: {method}, sparsity: {sparsity}}}
export: {{type: f16}}
waves:
  max_per_wave: {per_wave}
  heal: {{method: {heal}, steps: 15, lr: 1.0e-3}}
  stop_loss: {{threshold: {threshold}, patience: 2}}
"""


def _run(tmp_path, tiny_path, threshold, method="wanda", sparsity=0.5, per_wave=0.25, heal="blockwise"):
    r = tmp_path / "r.yaml"
    r.write_text(RECIPE.format(threshold=threshold, method=method, sparsity=sparsity, per_wave=per_wave, heal=heal))
    out = tmp_path / "run"
    metrics = compress(out, str(tiny_path), str(r))
    return out, metrics, json.loads((out / "prune_report.json").read_text())


def test_waves_reach_target_and_healing_recovers(tmp_path, tiny_path):
    out, metrics, rep = _run(tmp_path, tiny_path, threshold=1.0)
    assert rep["targets"] == [0.25, 0.5] and [w["wave"] for w in rep["waves"]] == [1, 2]
    assert abs(metrics["compressed"]["sparsity"] - 0.5) < 1e-3
    for w in rep["waves"]:
        assert w["ppl_healed"] < w["ppl_pruned"], w          # healing wins back part of each wave's loss
        assert w["verdict"]["action"] == "accept"
    ledger = Ledger(out)
    base = {k: v for k, v in load_file(str(tiny_path / "model.safetensors")).items()}
    base["lm_head.weight"] = base["model.embed_tokens.weight"]
    for k in (1, 2):
        state = ledger.state_at(k, base)           # verifies every tensor against the recorded hashes
        assert all(tensor_hash(state[n]) == r.hash for n, r in ledger.entry(k).tensors.items())
    final = load_file(str(out / "pruned" / "model.safetensors"))
    assert all(torch.equal(final[n], state[n]) for n in final)


def test_too_aggressive_waves_are_rolled_back_to_last_good_state(tmp_path, tiny_path):
    # magnitude to 70% in two waves, no healing, 1% allowed: both waves are bad
    out, metrics, rep = _run(tmp_path, tiny_path, threshold=0.01, method="magnitude", sparsity=0.7,
                             per_wave=0.35, heal="none")
    verdicts = [w["verdict"]["action"] for w in rep["waves"] if "verdict" in w]
    assert verdicts == ["continue", "rollback"]
    assert rep["waves"][-1]["rollback_to"] == 0 and rep["accepted_wave"] == 0
    ledger = Ledger(out)
    assert ledger.last_wave == 3                      # waves 1, 2 and the rollback record
    final = load_file(str(out / "pruned" / "model.safetensors"))
    base = load_file(str(tiny_path / "model.safetensors"))
    assert all(torch.equal(final[n], base[n]) for n in base)   # exactly the base bytes again
