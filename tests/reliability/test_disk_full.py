"""A full disk mid-step is one `error:` line naming it (exit 2), not an internal error."""
import errno

from clitools import assert_clean_failure, cli

import birdbone_core.steps as steps


def test_a_full_disk_is_one_clear_error_line(tmp_path, tiny_path, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("calibration: {n_samples: 2, seq_len: 32}\nprune: {method: magnitude, sparsity: 0.5}\n")
    assert cli("init", tmp_path / "run", "--model", tiny_path, "-r", recipe).returncode == 0

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "pruned"))

    monkeypatch.setattr(steps.stream_steps, "prune", full)
    assert_clean_failure(cli("prune", tmp_path / "run"), "no space left on the device", "pruned")
