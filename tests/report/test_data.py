"""The report's pure pieces: healing-curve shapes, the stop-loss replay behind the band, odd numbers."""
import math

from birdbone_core.report.data import RunData, WaveRow, heal_curves, pct_limit, split_decision
from birdbone_core.report.markdown import render
from birdbone_core.report.plots import accepted_limits, plot_ppl


def test_heal_curves_forms():
    flat = [0.5, 0.25, 0.125]
    assert heal_curves(flat) == {"overall": flat}
    assert heal_curves({"heal": {"method": "distill", "curve": flat}}) == {"overall": flat}
    per_layer = {"layer 0": [1.0, 0.5], "layer 1": [2.0, 1.5]}
    for form in ([[1.0, 0.5], [2.0, 1.5]],                                   # list of lists
                 {"layers": [{"curve": [1.0, 0.5]}, {"curve": [2.0, 1.5]}]},  # HealReport.as_dict()
                 {"heal": {"layer_curves": [[1.0, 0.5], [2.0, 1.5]]}},       # ledger metrics
                 {"report": {"layers": [{"curve": [1.0, 0.5]}, {"curve": [2.0, 1.5]}]}}):  # waves/K/heal.json
        assert heal_curves(form) == per_layer, form
    for nothing in (None, [], {}, {"curve": []}, {"heal": {"method": "none"}}, ["a", "b"], 3.0):
        assert heal_curves(nothing) == {}


def test_decision_words():
    assert split_decision("continue: wave 1: ppl 9 is +5% vs wave 0; strike 1 of 2") == (
        "strike", "wave 1: ppl 9 is +5% vs wave 0; strike 1 of 2")
    assert split_decision("one-shot wanda unstructured") == (None, "one-shot wanda unstructured")
    assert pct_limit(0.03) == "+3%" and pct_limit(0.002) == "+0.2%"


def _run(waves, threshold=0.03):
    return RunData(root=None, name="t", mode="waves", base_ppl=10.0, threshold=threshold, patience=2, waves=waves)


def test_band_follows_the_last_accepted_state():
    d = _run([WaveRow(1, ppl_healed=10.2, action="accept"),      # accepted: the reference becomes 10.2
              WaveRow(2, ppl_healed=11.0, action="strike"),      # not accepted: stays 10.2
              WaveRow(3, ppl_healed=10.4, action="accept")])
    got = accepted_limits(d)
    assert [(k, a) for k, a, _ in got] == [(1, 10.0), (2, 10.2), (3, 10.2)]
    assert all(math.isclose(lim, a * 1.03) for _, a, lim in got)


def test_non_finite_perplexity_is_shown_not_drawn(tmp_path):
    d = _run([WaveRow(1, ppl_pruned=12.0, ppl_healed=10.1, action="accept"),
              WaveRow(2, ppl_pruned=math.inf, ppl_healed=math.nan, action="rollback",
                      reason="wave 2: perplexity is nan; rolling back to wave 1")])
    assert plot_ppl(d, tmp_path / "p.png") and (tmp_path / "p.png").stat().st_size > 10_000
    md = render(d, [])
    row = next(line for line in md.splitlines() if line.startswith("| 2 |"))
    assert "| inf |" in row and "| nan |" in row
    assert "- **wave 2: rollback**: wave 2: perplexity is nan; rolling back to wave 1" in md
