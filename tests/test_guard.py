import math

from birdbone_core.guard import stop_loss


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
