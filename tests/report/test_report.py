"""The run report on real fixture runs: every wave, every decision with its reason, the healing curves,
valid non-trivial PNGs, and a report (listing what is missing) for runs that are not finished."""
import base64
import html
import json
import shutil
import struct

import numpy as np
import pytest

from birdbone_core.cli import main
from birdbone_core.errors import BirdboneError
from birdbone_core.ledger import Ledger
from birdbone_core.report import write_report
from birdbone_core.report.collect import collect
from birdbone_core.report.data import verdict_name
from birdbone_core.report.markdown import render

FIGS = ("ppl_per_wave.png", "healing_loss.png", "healing_per_wave.png", "sparsity_per_layer.png", "kld_top1.png")


def _png_ok(path, min_w=400, min_h=200):
    """A real PNG of at least min_w x min_h that is not blank: many colours, visible contrast."""
    from matplotlib.image import imread

    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR", path
    w, h = struct.unpack(">II", raw[16:24])
    assert w >= min_w and h >= min_h, (path, w, h)
    assert len(raw) > 10_000, (path, len(raw))
    img = imread(path)[..., :3]
    assert img.shape[:2] == (h, w)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50 and img.std() > 0.05, path


def _decision_line(md, wave, verdict):
    """The decision list's line for `wave`: "- **wave K: <verdict>** [→ next step]: <reason>"."""
    lines = [ln for ln in md.splitlines() if ln.startswith(f"- **wave {wave}: {verdict}**")]
    assert len(lines) == 1, (wave, verdict, md)
    return lines[0]


def _recorded_curve(w: dict) -> list[float]:
    """The distillation loss per step as the loop recorded it for one wave of prune_report.json."""
    return w["heal"]["curve"] if "heal" in w else w["heal_curve"]


def _report(run, tmp_path, name="report"):
    out = write_report(run, tmp_path / name)
    assert out == tmp_path / name / "report.md"
    return out.read_text()


def test_waves_report_lists_every_wave_its_numbers_and_decisions(healed_run, tmp_path):
    rep = json.loads((healed_run / "prune_report.json").read_text())
    md = _report(healed_run, tmp_path)
    waves = [w for w in rep["waves"] if "verdict" in w]
    assert [w["wave"] for w in waves] == [1, 2]
    for w in waves:
        # the wave's table row carries its measured numbers, the decision list its verdict and reason
        row = next(line for line in md.splitlines() if line.startswith(f"| {w['wave']} |"))
        for key in ("ppl_pruned", "ppl_healed"):
            assert f"{w[key]:.3f}" in row, (key, row)
        assert f"{w['kld']:.4f}" in row and f"{w['top1']:.1%}" in row and row.rstrip(" |").endswith("accept")
        assert _decision_line(md, w["wave"], "accept").endswith(": " + w["verdict"]["reason"])
    m = json.loads((healed_run / "metrics.json").read_text())
    assert f"{m['compressed']['ppl']:.3f}" in md and f"{m['base']['ppl']:.3f}" in md
    for f in FIGS:
        assert f"]({f})" in md
        _png_ok(tmp_path / "report" / f)
    # the self-contained HTML: every figure inlined byte for byte, every reason present
    page = (tmp_path / "report" / "report.html").read_text()
    for f in FIGS:
        assert base64.b64encode((tmp_path / "report" / f).read_bytes()).decode() in page
    for w in waves:
        assert html.escape(w["verdict"]["reason"], quote=False) in page


def test_healing_curves_are_the_recorded_losses(healed_run):
    rep = json.loads((healed_run / "prune_report.json").read_text())
    data = collect(healed_run)
    for w in rep["waves"]:
        assert len(_recorded_curve(w)) == 6               # one distillation loss per step
        assert data.find(w["wave"]).heal_curves == {"overall": _recorded_curve(w)}
    assert "no healing loss curves" not in "\n".join(data.missing)


def test_rollback_report_shows_strike_rollback_and_the_restored_state(rollback_run, tmp_path):
    rep = json.loads((rollback_run / "prune_report.json").read_text())
    md = _report(rollback_run, tmp_path)
    verdicts = [w["verdict"] for w in rep["waves"] if "verdict" in w]
    assert [verdict_name(v["action"]) for v in verdicts] == ["strike", "rollback"]
    # the stop-loss's "continue" after a bad wave is reported as the contract's "strike"
    assert _decision_line(md, 1, "strike").endswith(verdicts[0]["reason"])
    assert verdicts[1]["reason"] in _decision_line(md, 2, "rollback")
    assert "- **wave 3: rollback** to wave 0" in md
    assert "| 3 ↩ |" in md and "revert → 0" in md
    data = collect(rollback_run)
    assert [(r.wave, r.rollback_to) for r in data.rollbacks] == [(3, 0)]
    assert data.rollbacks[0].ppl == pytest.approx(rep["base_ppl"])
    # per-layer sparsity follows the ledger: pruned in waves 1-2, all zeros gone again after the rollback
    sp = {e.wave: e.linear_sparsity for e in data.ledger}
    assert sp[0] == 0 and sp[1] == pytest.approx(0.35, abs=1e-3) and sp[2] == pytest.approx(0.7, abs=1e-3)
    assert sp[3] == sp[0]
    for f in ("ppl_per_wave.png", "sparsity_per_layer.png", "kld_top1.png"):
        _png_ok(tmp_path / "report" / f)
    # no healing configured: no curve figure, and the report says so instead of drawing an empty one
    for f in ("healing_loss.png", "healing_per_wave.png"):
        assert not (tmp_path / "report" / f).exists() and f"{f} not drawn" in md
    assert "the recipe turns healing off" in md


def test_oneshot_report(oneshot_run, tmp_path):
    md = _report(oneshot_run, tmp_path)
    info = json.loads((oneshot_run / "prune_report.json").read_text())
    assert "one shot" in md and f"{info['sparsity']:.1%}" in md
    assert "| 1 | wave |" in md                                   # the ledger's one wave
    _png_ok(tmp_path / "report" / "sparsity_per_layer.png")
    data = collect(oneshot_run)
    assert data.ledger[-1].linear_sparsity == pytest.approx(0.5, abs=1e-3)


def test_run_in_progress_is_reported_from_the_ledger(healed_run, tmp_path):
    """No prune_report.json / metrics.json yet (a run between steps): the ledger still has every wave's
    metrics and decision, and the report says what is missing."""
    run = tmp_path / "partial"
    shutil.copytree(healed_run, run, ignore=shutil.ignore_patterns("*.gguf", "pruned", "report"))
    (run / "prune_report.json").unlink()
    (run / "metrics.json").unlink()
    md = _report(run, tmp_path)
    for e in Ledger(run).log()[1:]:
        action, _, reason = e.decision.partition(": ")
        assert _decision_line(md, e.wave, action).endswith(": " + reason)
        assert f"{e.metrics['ppl_healed']:.3f}" in md
    assert "no prune_report.json" in md and "no metrics.json" in md
    _png_ok(tmp_path / "report" / "ppl_per_wave.png")


def test_undecided_wave_is_reported_from_its_step_records(midway_run, tmp_path):
    md = _report(midway_run, tmp_path)
    w2 = {s: json.loads((midway_run / "waves" / "2" / f"{s}.json").read_text()) for s in ("prune", "evaluate")}
    row = next(line for line in md.splitlines() if line.startswith("| 2 |"))
    assert f"{w2['prune']['ppl_pruned']:.3f}" in row and f"{w2['evaluate']['ppl']:.3f}" in row
    assert "- **wave 2**: not decided yet" in md and "wave 2: no stop-loss decision recorded yet" in md
    assert _decision_line(md, 1, "accept")
    data = collect(midway_run)
    # block-wise healing: one curve per decoder layer, 4 steps each, in both waves
    for k in (1, 2):
        curves = data.find(k).heal_curves
        assert sorted(curves) == [f"layer {i}" for i in range(4)] and all(len(c) == 4 for c in curves.values())
    _png_ok(tmp_path / "report" / "healing_loss.png")
    _png_ok(tmp_path / "report" / "ppl_per_wave.png")


def test_decision_json_is_read(healed_run, tmp_path):
    """RUN/waves/K/decision.json (the step contract) supplies verdict and reason."""
    run = tmp_path / "contract"
    shutil.copytree(healed_run, run, ignore=shutil.ignore_patterns("*.gguf", "pruned", "report", "ledger"))
    (run / "prune_report.json").unlink()
    d = run / "waves" / "3"
    d.mkdir(parents=True)
    (d / "decision.json").write_text(json.dumps({
        "wave": 3, "action": "finish", "verdict": "strike", "accepted_wave": 2,
        "reason": "wave 3: ppl 9.9 is +5.0% vs wave 2 (limit +3%); strike 1 of 2",
        "metrics": {"ppl": 9.9, "sparsity": 0.3}}))
    md = render(collect(run), [])
    assert _decision_line(md, 3, "strike") == ("- **wave 3: strike** → finish: "
                                               "wave 3: ppl 9.9 is +5.0% vs wave 2 (limit +3%); strike 1 of 2")
    assert collect(run).accepted_wave == 2


def test_bare_run_still_reports(tmp_path, tiny_path):
    from birdbone_core.run_init import init_run

    run = tmp_path / "bare"
    init_run(run, str(tiny_path), None)
    md = _report(run, tmp_path)
    assert "No wave recorded yet." in md and "no prune_report.json" in md and "no ledger" in md
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["report.html", "report.md"]


def test_cli_report_and_errors(healed_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cli"
    assert main(["report", str(healed_run), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.md")
    good = (out / "report.md").read_bytes()

    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "not a birdbone run directory" in capsys.readouterr().err

    # a corrupt input file is named, and the previous report stays as it was
    bad = tmp_path / "bad"
    shutil.copytree(healed_run, bad, ignore=shutil.ignore_patterns("*.gguf", "pruned", "report"))
    (bad / "prune_report.json").write_text('{"waves": [')
    assert main(["report", str(bad), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "prune_report.json" in err and len(err.strip().splitlines()) == 1
    assert (out / "report.md").read_bytes() == good
    assert not [p for p in tmp_path.glob(".cli.*")]

    # an output directory holding anything but a report is refused, never replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["report", str(healed_run), "-o", str(mine)]) == 2
    assert "notes.txt" in capsys.readouterr().err and (mine / "notes.txt").read_text() == "keep me"
    assert main(["report", str(healed_run), "-o", str(healed_run)]) == 2
    assert "cannot be the run directory" in capsys.readouterr().err

    # a report that fails half-way (a figure raising after writing half a file) leaves the old one whole
    from birdbone_core.report import plots

    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(data, path):
        path.write_bytes(b"half a png")
        raise RuntimeError("disk full")

    monkeypatch.setattr(plots, "FIGURES", (("ppl_per_wave.png", boom, "x"),))
    with pytest.raises(RuntimeError):
        write_report(healed_run, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.glob(".cli.*")]


def test_not_a_run(tmp_path):
    with pytest.raises(BirdboneError, match="no run.json"):
        collect(tmp_path)


def test_one_shot_and_wave_runs_write_one_prune_report_schema(oneshot_run, healed_run, rollback_run):
    """prune_report.json has one schema (report.prune_report.PruneReport, extra keys refused) whichever way
    the run was pruned: a one-shot prune reads as one accepted wave, with its per-layer errors."""
    from birdbone_core.report.prune_report import PruneReport

    reps = {name: json.loads((run / "prune_report.json").read_text())
            for name, run in (("oneshot", oneshot_run), ("healed", healed_run), ("rollback", rollback_run))}
    parsed = {name: PruneReport.model_validate(rep) for name, rep in reps.items()}
    assert len({tuple(rep) for rep in reps.values()}) == 1                  # the same keys, in the same order
    one = parsed["oneshot"]
    assert (one.mode, one.accepted_wave, one.ledger_wave, one.targets) == ("one-shot", 1, 1, [0.5])
    assert one.waves == [{"wave": 1, "sparsity": one.sparsity, "seconds": one.seconds, "action": "finish"}]
    assert one.layers is not None and len(one.layers.layer_rel_error) > 0 and one.base_ppl is not None
    assert parsed["healed"].mode == "waves" and len(parsed["healed"].waves) > 1
    assert any("rollback_to" in w for w in parsed["rollback"].waves)
    run_json = json.loads((oneshot_run / "run.json").read_text())["steps"]["prune"]
    assert {k: run_json[k] for k in one.summary()} == json.loads(json.dumps(one.summary()))
