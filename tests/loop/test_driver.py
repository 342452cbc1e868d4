"""The stop-loss through the loop's steps: too-aggressive waves are rolled back to the last good state,
the final weights are that state's exact bytes, and `revert` rebuilds every wave's recorded hashes."""
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from birdbone_core.ledger import Ledger, tensor_hash
from birdbone_core.loop.driver import run_all, status
from birdbone_core.run import Run
from birdbone_core.run_init import init_run
from birdbone_core.steps import revert


@pytest.fixture(scope="module")
def rolled_back(tmp_path_factory, tiny_path, make_recipe) -> Run:
    # magnitude pruning, no healing, 2% allowed: 20% is harmless, 40% and 60% are not; 80% never runs
    aggressive = make_recipe({"method": "magnitude", "sparsity": 0.8},
                             {"max_per_wave": 0.2, "heal": {"method": "none"},
                              "stop_loss": {"threshold": 0.02, "patience": 2}})
    root = tmp_path_factory.mktemp("loop") / "run"
    rp = root.parent / "aggressive.yaml"
    rp.write_text(yaml.safe_dump(aggressive))
    run = init_run(root, str(tiny_path), str(rp))
    run_all(run, until=("export", "evaluate"))
    return run


def _decision(run, k):
    p = run.root / "waves" / str(k) / "decision.json"
    return json.loads(p.read_text()) if p.exists() else None


def _base_state(tiny_path):
    base = load_file(str(tiny_path / "model.safetensors"))
    base["lm_head.weight"] = base["model.embed_tokens.weight"]    # the fixture ties its embeddings
    return base


def test_stop_loss_rolls_back_to_the_last_good_wave(rolled_back, tiny_path):
    d = [_decision(rolled_back, k) for k in (1, 2, 3, 4)]
    assert [(x["verdict"], x["action"]) for x in d[:3]] == [("accept", "continue"), ("strike", "continue"),
                                                             ("rollback", "rollback")]
    assert d[3] is None                                    # the stop-loss ended the run before wave 4
    assert d[2]["accepted_wave"] == 1 and "rolling back to wave 1" in d[2]["reason"]
    assert d[1]["metrics"]["ppl"] > d[0]["metrics"]["ppl"] * 1.02
    ledger = Ledger(rolled_back.root)
    assert ledger.last_wave == 4 and ledger.entry(4).kind == "revert" and ledger.entry(4).reverts_to == 1
    # the final weights are exactly the accepted state's bytes, rebuilt from the base + wave 1's delta
    accepted = ledger.state_at(1, _base_state(tiny_path))
    final = load_file(str(rolled_back.pruned_dir / "model.safetensors"))
    assert final and all(torch.equal(final[n].view(torch.uint8), accepted[n].view(torch.uint8)) for n in final)
    assert abs(ledger.entry(1).sparsity - ledger.entry(4).sparsity) < 1e-12
    s = status(rolled_back)
    assert s["accepted_wave"] == 1 and s["next"] == "export" and "rollback" in s["done"]
    rep = json.loads((rolled_back.root / "prune_report.json").read_text())
    assert rep["accepted_wave"] == 1 and rep["waves"][-1]["rollback_to"] == 1
    assert abs(rep["sparsity"] - 0.2) < 1e-3


def test_revert_to_every_wave_reproduces_its_recorded_hashes(rolled_back, tmp_path):
    ledger = Ledger(rolled_back.root)
    table = dict(ledger.entry(0).tensors)
    for w in range(ledger.last_wave + 1):
        if w:
            table.update(ledger.entry(w).tensors)
        out = revert(rolled_back, w, tmp_path / f"wave{w}")
        saved = load_file(str(out / "model.safetensors"))
        assert set(saved) <= set(table) and len(saved) >= len(table) - 1     # tied lm_head stored once
        bad = [n for n, t in saved.items() if tensor_hash(t) != table[n].hash]
        assert not bad, (w, bad[:3])
