"""Canaries: recipe-listed prompts scored by log-likelihood ranking and greedy match; failures by name."""
import pytest

from birdbone_core.errors import BirdboneError
from birdbone_core.eval.adapters import TorchLM
from birdbone_core.eval.canaries import Canary, check_canaries, failed, rank_choices, summary
from birdbone_core.recipe import parse_recipe


def test_rank_choices_pure():
    assert rank_choices([-1.0, -3.0, -2.0], 0) == (True, 0)
    assert rank_choices([-1.0, -3.0, -2.0], 2) == (False, 0)
    assert rank_choices([-1.0, -1.0], 0)[0] is False          # a tie is not a pass


def test_recipe_validates_canaries():
    r = parse_recipe({"evaluation": {"canaries": [
        {"name": "a", "prompt": "p", "expect": " x"}, {"name": "b", "prompt": "p", "choices": ["x", "y"], "answer": 1}]}})
    assert [c.name for c in r.evaluation.canaries] == ["a", "b"]
    for bad, msg in ((dict(name="a", prompt="p"), "exactly one of 'expect' or 'choices'"),
                     (dict(name="a", prompt="p", expect="x", choices=["x", "y"]), "exactly one"),
                     (dict(name="a", prompt="p", choices=["x", "y"], answer=2), "out of range"),
                     (dict(name="a", prompt="p", expect="x", colour=1), "unknown field")):
        with pytest.raises(BirdboneError, match=msg):
            parse_recipe({"evaluation": {"canaries": [bad]}})
    with pytest.raises(BirdboneError, match="used twice: a"):
        parse_recipe({"evaluation": {"canaries": [dict(name="a", prompt="p", expect="x")] * 2}})


def test_canaries_on_fixture_report_failures_by_name(_tiny_loaded):
    lm = TorchLM(_tiny_loaded)
    prompt = "The dictionary maps each key to a"
    said = lm.greedy(prompt, 3, [])                       # what the model itself continues with
    ll = [s[0] for s in lm.score_pairs([(prompt, " value"), (prompt, " zebra")])]
    best, worst = (" value", " zebra") if ll[0] > ll[1] else (" zebra", " value")
    canaries = [
        Canary(name="own-greedy", prompt=prompt, expect=said),                 # must pass: greedy agrees
        Canary(name="nonsense", prompt=prompt, expect=" xylophone quartz"),    # must fail
        Canary(name="ranked-right", prompt=prompt, choices=[best, worst], answer=0),
        Canary(name="ranked-wrong", prompt=prompt, choices=[best, worst], answer=1),
    ]
    res = check_canaries(lm, canaries)
    assert [r.passed for r in res] == [True, False, True, False]
    assert failed(res) == ["nonsense", "ranked-wrong"]
    assert summary(res) == "canaries: 2/4 passed; failed: nonsense, ranked-wrong"
    assert repr(best) in res[3].detail and "model prefers" in res[3].detail
    assert "greedy gives" in res[1].detail
