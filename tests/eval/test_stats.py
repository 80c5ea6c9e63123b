import pytest

from visionmoe.eval.stats import format_difference, paired_difference


def test_paired_difference_hand_numbers():
    # d = [0.02, 0.04, 0.03]: mean 0.03, sd 0.01, t(0.975, 2) = 4.302653, half = 4.302653 * 0.01 / sqrt(3)
    r = paired_difference([0.92, 0.94, 0.93], [0.90, 0.90, 0.90])
    assert r["mean"] == pytest.approx(0.03) and r["std"] == pytest.approx(0.01)
    half = 4.302653 * 0.01 / 3**0.5
    assert r["ci"] == pytest.approx([0.03 - half, 0.03 + half], abs=1e-6)
    assert r["verdict"] == "reproduced"
    assert paired_difference([0.92, 0.94, 0.93], [0.90, 0.90, 0.90], direction=-1)["verdict"] == "refuted"
    noisy = paired_difference([0.91, 0.89, 0.93], [0.90, 0.90, 0.90])
    assert noisy["ci"][0] < 0 < noisy["ci"][1] and noisy["verdict"] == "not resolved"


def test_one_seed_has_no_interval_and_no_fake_std():
    r = paired_difference([0.5], [0.4])
    assert r["ci"] is None and r["std"] is None and r["verdict"] == "not resolved (1 seed)"
    assert "±" not in format_difference(r) and "no interval" in format_difference(r)
    with pytest.raises(ValueError, match="same, non-zero length"):
        paired_difference([0.1, 0.2], [0.1])
