import math

import pytest

from birdbone_core.guard import Verdict, accuracy_guard, combine, stop_loss


def test_accept_within_threshold_resets_strikes():
    v = stop_loss(3, 10.2, accepted_wave=2, accepted_ppl=10.0, strikes=1)
    assert v.action == "accept" and v.accepted_wave == 3 and v.accepted_ppl == 10.2 and v.strikes == 0


def test_two_bad_waves_in_a_row_roll_back():
    v1 = stop_loss(3, 10.5, 2, 10.0, 0)
    assert v1.action == "continue" and v1.accepted_wave == 2 and v1.strikes == 1
    v2 = stop_loss(4, 10.6, v1.accepted_wave, v1.accepted_ppl, v1.strikes)
    assert v2.action == "rollback" and v2.accepted_wave == 2 and "wave 2" in v2.reason


def test_nan_rolls_back_at_once():
    v = stop_loss(1, math.nan, 0, 10.0, 0)
    assert v.action == "rollback" and v.accepted_wave == 0


BASE = {"pydocs_cloze": 0.80, "pydocs_lastword": 0.40}


def test_accuracy_within_threshold_accepts_and_resets():
    v = accuracy_guard(3, {"pydocs_cloze": 0.78, "pydocs_lastword": 0.40}, BASE, strikes=1)   # -2.5%
    assert v.action == "accept" and v.strikes == 0 and v.failing == []
    assert v.drops["pydocs_cloze"] == pytest.approx(-0.025)


def test_accuracy_two_bad_waves_stop_and_name_the_task():
    v1 = accuracy_guard(2, {"pydocs_cloze": 0.80, "pydocs_lastword": 0.38}, BASE, 0)        # -5%
    assert v1.action == "continue" and v1.strikes == 1 and v1.failing == ["pydocs_lastword"]
    assert "pydocs_lastword" in v1.reason and "strike 1 of 2" in v1.reason
    v2 = accuracy_guard(3, {"pydocs_cloze": 0.70, "pydocs_lastword": 0.39}, BASE, v1.strikes)
    assert v2.action == "rollback" and v2.failing == ["pydocs_cloze"]       # -12.5% (lastword -2.5% is ok)
    assert v2.reason.startswith("wave 3: pydocs_cloze accuracy 0.700 is -12.5% vs base 0.800")
    # patience 1 stops at the first bad wave; a missing task is a bug, not a pass
    assert accuracy_guard(2, {"pydocs_cloze": 0.5, "pydocs_lastword": 0.4}, BASE, 0, patience=1).action == "rollback"
    with pytest.raises(ValueError, match="pydocs_lastword"):
        accuracy_guard(2, {"pydocs_cloze": 0.8}, BASE, 0)


def test_combine_stricter_wins():
    ok_ppl = stop_loss(4, 10.1, 3, 10.0, 0)                   # perplexity says accept wave 4
    acc_bad = accuracy_guard(4, {"pydocs_cloze": 0.5, "pydocs_lastword": 0.4}, BASE, 0)
    v = combine(ok_ppl, acc_bad, prev_accepted_wave=3, prev_accepted_ppl=10.0)
    assert v == Verdict("continue", acc_bad.reason, 3, 10.0, 1)        # not accepted
    acc_stop = accuracy_guard(5, {"pydocs_cloze": 0.5, "pydocs_lastword": 0.4}, BASE, 1)
    v = combine(stop_loss(5, 10.1, 3, 10.0, 0), acc_stop, 3, 10.0)
    assert v.action == "rollback" and v.accepted_wave == 3 and "pydocs_cloze" in v.reason
    acc_ok = accuracy_guard(4, BASE, BASE, 0)
    assert combine(ok_ppl, acc_ok, 3, 10.0) == ok_ppl


def test_accuracy_guard_trips_on_fixture_run(tiny):
    """A recipe with an accuracy guardrail; waves of ever harsher magnitude pruning of the fixture model,
    scored through the task machinery; the guardrail stops the run and names the task."""
    import torch

    from birdbone_core.eval.adapters import TorchLM
    from birdbone_core.eval.tasks import accuracy_report
    from birdbone_core.model.layers import decoder_layers, linear_modules
    from birdbone_core.prune.magnitude import magnitude_prune
    from birdbone_core.recipe import parse_recipe

    ev = parse_recipe({"evaluation": {"tasks": ["pydocs_cloze"], "task_limit": 64,
                                      "accuracy_guard": {"threshold": 0.03, "patience": 2}}}).evaluation
    lm = tiny                                                 # a fresh copy: pruned in place below
    base = accuracy_report(TorchLM(lm), ev)["accuracy"]
    assert base["pydocs_cloze"] > 0.4                        # far from chance before pruning
    strikes, verdicts = 0, []
    for wave, sparsity in enumerate((0.85, 0.999), start=1):
        with torch.no_grad():
            for layer in decoder_layers(lm.model):
                for mod in linear_modules(layer).values():
                    mod.weight.copy_(magnitude_prune(mod.weight, sparsity)[0])
        acc = accuracy_report(TorchLM(lm), ev)["accuracy"]
        v = accuracy_guard(wave, acc, base, strikes, ev.accuracy_guard.threshold, ev.accuracy_guard.patience)
        verdicts.append(v)
        strikes = v.strikes
    assert [v.action for v in verdicts] == ["continue", "rollback"]
    assert "pydocs_cloze" in verdicts[-1].reason and "stops the run" in verdicts[-1].reason
