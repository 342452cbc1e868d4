"""The loop's plan: which steps are done and which comes next, from the markers in a run directory."""
import json

from birdbone_core.loop.layout import WAVE_STEPS, Layout, plan


def _mark(root, k, step, **extra):
    p = Layout(root).marker(k, step)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"wave": k, **extra}))


def _wave(root, k, action, accepted):
    for s in WAVE_STEPS[:-1]:
        _mark(root, k, s)
    _mark(root, k, "decide", action=action, accepted_wave=accepted)


def test_fresh_run_starts_with_prepare(tmp_path):
    assert plan(tmp_path, 3, {}) == ([], "prepare", None, False)


def test_next_step_inside_a_wave(tmp_path):
    Layout(tmp_path).prepare_dir.mkdir()
    Layout(tmp_path).prepare_marker.write_text("{}")
    _wave(tmp_path, 1, "continue", 1)
    _mark(tmp_path, 2, "prune")
    done, nxt, accepted, finished = plan(tmp_path, 3, {})
    assert done == ["prepare", *[f"wave 1 {s}" for s in WAVE_STEPS], "wave 2 prune"]
    assert nxt == "wave 2 heal" and accepted == 1 and not finished


def test_rollback_ends_the_waves_early(tmp_path):
    Layout(tmp_path).prepare_dir.mkdir()
    Layout(tmp_path).prepare_marker.write_text("{}")
    _wave(tmp_path, 1, "continue", 1)
    _wave(tmp_path, 2, "rollback", 1)
    _, nxt, accepted, _ = plan(tmp_path, 5, {})
    assert nxt == "rollback" and accepted == 1          # waves 3..5 never run
    Layout(tmp_path).rollback_marker.write_text("{}")
    assert plan(tmp_path, 5, {})[1] == "finish"
    done, nxt, _, finished = plan(tmp_path, 5, {"finish": {}, "export": {}, "evaluate": {}})
    assert nxt is None and finished and done[-4:] == ["rollback", "finish", "export", "evaluate"]


def test_last_wave_finish_skips_rollback(tmp_path):
    Layout(tmp_path).prepare_dir.mkdir()
    Layout(tmp_path).prepare_marker.write_text("{}")
    _wave(tmp_path, 1, "finish", 1)
    assert plan(tmp_path, 1, {"finish": {}})[1] == "export"
