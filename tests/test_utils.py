import pytest

from visionmoe._utils import mean_std


def test_mean_std_by_hand():
    assert mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}  # unbiased: sqrt(2 / 2)
    assert mean_std([0.5]) == {"mean": 0.5, "std": 0.0, "n": 1}
    assert mean_std(x for x in (2.0, 4.0))["std"] == pytest.approx(2 ** 0.5)
