"""Every file a step reads back from a run directory is checked against the hash recorded when it was
written: a damaged, edited or swapped file is refused by the command that would read it and by
`birdbone verify`, with one error line and nothing changed."""
import shutil

import pytest
from clitools import assert_clean_failure, cli, tree
from tiny_recipes import tiny_recipe, waves

WAVES = tiny_recipe("verify", {"method": "magnitude", "sparsity": 0.4},
                    waves=waves(0.2, {"method": "blockwise", "steps": 1}, threshold=10.0, patience=1))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_path):
    """A 2-wave run stopped after `prepare` (baseline outputs, calibration cache, ledger base)."""
    root = tmp_path_factory.mktemp("verify")
    (root / "r.yaml").write_text(WAVES)
    run = root / "run"
    for args in (("init", run, "--model", tiny_path, "-r", root / "r.yaml"), ("prepare", run)):
        r = cli(*args)
        assert r.returncode == 0, r.stderr
    assert cli("verify", run).returncode == 0
    return run


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_path):
    root = tmp_path_factory.mktemp("verify-done")
    (root / "r.yaml").write_text(WAVES)
    run = root / "run"
    assert cli("init", run, "--model", tiny_path, "-r", root / "r.yaml").returncode == 0
    r = cli("run", run)
    assert r.returncode == 0, r.stderr
    return run


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_lists_what_it_checked(prepared, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(prepared, run)
    assert cli("wave", run, 1, "prune").returncode == 0
    r = cli("verify", run)
    assert r.returncode == 0, r.stderr
    for needle in ("recipe.yaml: sha256", "baseline/reference.safetensors: sha256",
                   "prepare/calibration.safetensors: sha256", "waves/1/prune.safetensors: sha256",
                   "ledger: base and 0 wave(s)", "base/: 38 tensors match the ledger's base hashes"):
        assert needle in r.stdout, r.stdout


@pytest.mark.parametrize("victim, first, reader", [
    ("waves/1/prune.safetensors", ("wave", "{run}", 1, "prune"), ("wave", "{run}", 1, "heal")),
    ("prepare/calibration.safetensors", None, ("wave", "{run}", 1, "prune")),
    ("baseline/reference.safetensors", None, ("wave", "{run}", 1, "prune")),
])
def test_a_damaged_intermediate_is_refused_by_its_reader_and_by_verify(prepared, tmp_path, victim, first, reader):
    run = tmp_path / "run"
    shutil.copytree(prepared, run)
    if first:
        assert cli(*[a.format(run=run) if isinstance(a, str) else a for a in first]).returncode == 0
    _flip_last_byte(run / victim)
    before = tree(run)
    for args in ([a.format(run=run) if isinstance(a, str) else a for a in reader], ("verify", run)):
        assert_clean_failure(cli(*args), victim.split("/")[-1], "differ from the sha256 recorded when it was written")
    assert tree(run) == before


def test_an_overlay_swapped_in_from_another_step_is_refused(prepared, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(prepared, run)
    assert cli("wave", run, 1, "prune").returncode == 0
    (run / "waves/1/prune.safetensors").write_bytes((run / "prepare/calibration.safetensors").read_bytes())
    assert_clean_failure(cli("wave", run, 1, "heal"), "prune.safetensors", "differ from the sha256")


@pytest.mark.parametrize("damage", ["flip", "swap", "truncate"])
def test_damaged_ledger_deltas_are_refused_by_log_diff_revert_and_verify(finished, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    deltas = sorted((run / "ledger").glob("wave-*/delta.safetensors"))
    assert len(deltas) >= 2
    if damage == "flip":
        _flip_last_byte(deltas[0])
    elif damage == "swap":
        a, b = deltas[0].read_bytes(), deltas[1].read_bytes()
        deltas[0].write_bytes(b)
        deltas[1].write_bytes(a)
    else:
        deltas[0].write_bytes(deltas[0].read_bytes()[:-7])
    for args in (("log", run), ("diff", run, 0, len(deltas)), ("revert", run, "--to", 1, "-o", tmp_path / "out"),
                 ("verify", run)):
        assert_clean_failure(cli(*args), "delta.safetensors", "damaged or swapped delta file")
    assert not (tmp_path / "out").exists()


def test_a_damaged_base_copy_is_refused_by_the_next_wave_and_by_verify(prepared, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(prepared, run)
    _flip_last_byte(run / "base" / "model.safetensors")
    assert_clean_failure(cli("verify", run), "model.safetensors", "damaged base copy")
    assert_clean_failure(cli("wave", run, 1, "prune"), "differs from the recorded base")
