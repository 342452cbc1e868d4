import pytest
from pydantic import ValidationError

from birdbone_core.heal import Heal, healing_data, schedule
from birdbone_core.recipe import Calibration


def test_defaults_and_unknown_keys():
    cfg = Heal()
    assert (cfg.method, cfg.steps, cfg.base_lr, cfg.trainable, cfg.taper) == ("blockwise", 200, 2e-4, "weights", False)
    assert Heal(method="distill").base_lr == 3e-5 and Heal(method="distill", lr=1e-4).base_lr == 1e-4
    with pytest.raises(ValidationError, match="extra"):
        Heal(stesp=10)
    with pytest.raises(ValidationError):
        Heal(method="lora")
    with pytest.raises(ValidationError):
        Heal(trainable="everything")
    with pytest.raises(ValidationError):
        Heal(block_loss="l1")


def test_schedule_taper():
    cfg = Heal(steps=200, lr=2e-4, taper=True)
    got = [schedule(cfg, k, 4) for k in (1, 2, 3, 4)]
    assert [s for s, _ in got] == [200, 150, 100, 50]
    assert [lr for _, lr in got] == pytest.approx([2e-4, 1.5e-4, 1e-4, 0.5e-4])
    assert schedule(Heal(steps=200, lr=2e-4), 3, 4) == (200, 2e-4)
    assert schedule(Heal(method="distill", steps=100, taper=True), 2, 2) == (50, 1.5e-5)
    with pytest.raises(ValueError):
        schedule(cfg, 0, 4)
    with pytest.raises(ValueError):
        schedule(cfg, 5, 4)


def test_healing_data_defaults_to_calibration():
    calib = Calibration(n_samples=64, seq_len=512, seed=3)
    assert healing_data(Heal(), calib) is calib
    got = healing_data(Heal(n_samples=16, seq_len=256), calib)
    assert (got.n_samples, got.seq_len, got.seed) == (16, 256, 3)


def test_heal_none_is_a_no_op():
    from birdbone_core.heal import heal
    assert heal(None, None, None, Heal(method="none")) is None
