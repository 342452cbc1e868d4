"""Real small runs on the fixture model, built once per session with the library's own `compress`
(the same steps the CLI runs), for the report tests to read."""
import pytest
import torch

RECIPE = """
name: report-{name}
calibration: {{n_samples: 8, seq_len: 64}}
evaluation: {{n_ctx: 128, max_chunks: 4}}
prune: {{method: {method}, sparsity: {sparsity}}}
export: {{type: f16}}
{waves}"""
WAVES = """waves:
  max_per_wave: {per_wave}
  heal: {{method: {heal}, steps: {steps}, lr: 3.0e-4, batch_size: 4}}
  stop_loss: {{threshold: {threshold}, patience: 2}}
"""


def _compress(tmp_path_factory, tiny_path, name, method, sparsity, **waves):
    from birdbone_core.compress import compress

    tmp = tmp_path_factory.mktemp(f"report-{name}")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(RECIPE.format(name=name, method=method, sparsity=sparsity,
                                    waves=WAVES.format(**waves) if waves else ""))
    n = torch.get_num_threads()
    torch.set_num_threads(1)          # backprop on contended cores: 1 thread is much faster than 2
    try:
        compress(tmp / name, str(tiny_path), str(recipe))
    finally:
        torch.set_num_threads(n)
    return tmp / name


@pytest.fixture(scope="session")
def healed_run(tmp_path_factory, tiny_path):
    """Wanda to 50% in two waves, each healed by distillation (which reports a loss per step); every
    wave is accepted (a 100% stop-loss threshold)."""
    return _compress(tmp_path_factory, tiny_path, "healed", method="wanda", sparsity=0.5, per_wave=0.25,
                     heal="distill", steps=6, threshold=1.0)


@pytest.fixture(scope="session")
def rollback_run(tmp_path_factory, tiny_path):
    """Magnitude to 70% in two waves without healing and a 1% stop-loss: both waves are bad, the second
    one rolls the run back to the base (wave 0)."""
    return _compress(tmp_path_factory, tiny_path, "rollback", method="magnitude", sparsity=0.7, per_wave=0.35,
                     heal="none", steps=0, threshold=0.01)


@pytest.fixture(scope="session")
def oneshot_run(tmp_path_factory, tiny_path):
    """SparseGPT 50% in one shot (no `waves:` section): no verdicts, no healing curves."""
    return _compress(tmp_path_factory, tiny_path, "oneshot", method="sparsegpt", sparsity=0.5)


@pytest.fixture(scope="session")
def midway_run(tmp_path_factory, tiny_path):
    """A run stopped between steps, driven by the step contract's CLI (in this process): wave 1 decided,
    wave 2 pruned, healed and evaluated but not yet decided."""
    from birdbone_core.cli import main

    tmp = tmp_path_factory.mktemp("report-midway")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(RECIPE.format(name="midway", method="wanda", sparsity=0.5, waves=WAVES.format(
        per_wave=0.25, heal="blockwise", steps=4, threshold=1.0)))
    run = tmp / "midway"
    steps = [["init", run, "--model", tiny_path, "-r", recipe], ["prepare", run]]
    steps += [["wave", run, "1", s] for s in ("prune", "heal", "regrow", "evaluate", "decide")]
    steps += [["wave", run, "2", s] for s in ("prune", "heal", "regrow", "evaluate")]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for args in steps:
            assert main([str(a) for a in args]) == 0, args
    finally:
        torch.set_num_threads(n)
    return run
