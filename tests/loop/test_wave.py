"""The loop's steps one at a time: each from a fresh context (as a separate process would run it) gives
the same ledger and weights as the one-process driver; refusals and no-ops; NaN rolls back at once."""
import json

import pytest
import torch
from safetensors.torch import load_file

from birdbone_core.errors import BirdboneError
from birdbone_core.ledger import Ledger
from birdbone_core.loop.context import Context
from birdbone_core.loop.driver import run_all, run_step, status
from birdbone_core.loop.layout import plan


def _healing_recipe(make_recipe):
    return make_recipe({"method": "wanda", "sparsity": 0.5},
                       {"max_per_wave": 0.25, "heal": {"method": "blockwise", "steps": 4, "lr": 1.0e-3},
                        "regrow": {"method": "rigl", "fraction": 0.05},
                        "stop_loss": {"threshold": 1.0, "patience": 2}})


def _steps_one_by_one(run):
    while True:
        _, nxt, _, _ = plan(run.root, Context(run).n_waves, run.manifest()["steps"])
        if nxt in (None, "export"):
            return
        run_step(Context(run), nxt)          # nothing carried over in memory between steps


def test_separate_steps_equal_the_driver(tmp_path, new_run, make_recipe):
    recipe = _healing_recipe(make_recipe)
    a, b = new_run(tmp_path / "steps", recipe), new_run(tmp_path / "driver", recipe)
    with pytest.raises(BirdboneError, match="needs step 'wave 1 prune' first"):
        run_step(Context(a), "wave 1 heal")
    with pytest.raises(BirdboneError, match="needs step 'prepare' first"):
        run_step(Context(a), "wave 1 prune")
    _steps_one_by_one(a)
    run_all(b, until=("export", "evaluate"))
    ia, ib = (json.loads((r.root / "ledger" / "index.json").read_text()) for r in (a, b))
    assert [w["digest"] for w in ia["waves"]] == [w["digest"] for w in ib["waves"]] and len(ia["waves"]) == 2
    wa, wb = (load_file(str(r.pruned_dir / "model.safetensors")) for r in (a, b))
    assert all(torch.equal(wa[n], wb[n]) for n in wa)
    # healing ran on the wave's output; regrowth swapped weights without changing the zero count
    for k in (1, 2):
        he = json.loads((a.root / "waves" / str(k) / "heal.json").read_text())
        assert he["report"]["loss_after"] < he["report"]["loss_before"]
        rg = json.loads((a.root / "waves" / str(k) / "regrow.json").read_text())
        assert rg["swapped"] > 0
        assert not (a.root / "waves" / str(k) / "heal.safetensors").exists()   # folded into the ledger
    assert abs(Ledger(a.root).entry(2).metrics["sparsity"] - 0.5) < 1e-3
    assert run_step(Context(a), "wave 2 heal") is None                           # already done: no-op
    with pytest.raises(BirdboneError, match="no wave 3"):
        run_step(Context(a), "wave 3 prune")
    assert status(a)["next"] == "export" and status(a)["accepted_wave"] == 2


def test_non_finite_weights_roll_the_wave_back_at_once(nan_wave_run):
    # a diverged step: one weight of the wave's output becomes NaN
    run, ov, name = nan_wave_run({"threshold": 0.5, "patience": 3})
    ev = run_step(Context(run), "wave 1 evaluate")
    assert ev["finite"] is False and ev["nonfinite"] == name
    kept = ov.read_bytes()
    d = run_step(Context(run), "wave 1 decide")
    assert (d["verdict"], d["action"], d["accepted_wave"]) == ("rollback", "rollback", 0)   # patience 3 ignored
    # decide killed after the ledger write and before its marker: the retry records nothing new
    (run.root / "waves" / "1" / "decision.json").unlink()
    ov.write_bytes(kept)
    again = run_step(Context(run), "wave 1 decide")
    assert {**again, "seconds": 0} == {**d, "seconds": 0} and Ledger(run.root).last_wave == 1
    run_step(Context(run), "rollback")
    run_step(Context(run), "finish")
    final = load_file(str(run.pruned_dir / "model.safetensors"))
    assert torch.isfinite(final[name]).all() and (final[name] != 0).all()      # the base, not wave 1
    assert status(run)["next"] == "export"
