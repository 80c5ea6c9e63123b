import pytest

from visionmoe.moe import resolve_placement


def test_named_policies():
    assert resolve_placement("every_2", 12) == [1, 3, 5, 7, 9, 11]  # vmoe: range(n-1, L, n)
    assert resolve_placement("every_3", 7) == [2, 5]
    assert resolve_placement("last_2", 12) == [10, 11]
    assert resolve_placement("all", 3) == [0, 1, 2]
    assert resolve_placement("none", 3) == [] and resolve_placement(None, 3) == []
    assert resolve_placement([11, 10, 10], 12) == [10, 11]
    assert resolve_placement("layers=[10, 11]", 12) == [10, 11]


def test_by_gradient_magnitude():
    scores = [0.1, 0.5, 0.2, 0.9]
    assert resolve_placement("by_gradient_magnitude", 4, scores=scores, num_layers=2) == [1, 3]
    with pytest.raises(ValueError, match="scores"):
        resolve_placement("by_gradient_magnitude", 4)


def test_errors():
    with pytest.raises(ValueError, match="out of range"):
        resolve_placement([12], 12)
    with pytest.raises(ValueError, match="Did you mean 'every_2'"):
        resolve_placement("evry_2", 12)
    with pytest.raises(ValueError, match="last_n"):
        resolve_placement("last_13", 12)
