import math

import pytest
import torch

from visionmoe.eval import knn_accuracy, knn_predict, logme
from visionmoe.eval.transfer import _evidence, _fit_alpha_beta


def test_knn_hand_example():
    # train points on the unit circle; a test point next to the two class-1 points
    tr = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [-1.0, 0.0]])
    ty = torch.tensor([0, 1, 1, 0])
    te = torch.tensor([[0.05, 1.0], [1.0, 0.05]])
    assert knn_predict(tr, ty, te, k=3).tolist() == [1, 0]
    assert knn_accuracy(tr, ty, te, torch.tensor([1, 1]), k=3) == 0.5
    with pytest.raises(ValueError, match="labels"):
        knn_predict(tr, ty[:3], te)


def test_knn_on_real_digits_beats_chance():
    from visionmoe.data import load_dataset

    d = load_dataset("digits")
    acc = knn_accuracy(d.x_train.flatten(1), d.y_train, d.x_test.flatten(1), d.y_test, k=10)
    assert acc > 0.9  # raw-pixel k-NN on 8x8 digits is ~97%


def test_logme_evidence_equals_gaussian_marginal_likelihood():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = (torch.rand(40, generator=g) > 0.5).double()
    sigma, v = torch.linalg.eigh(f.T @ f)
    for alpha, beta in [(1.0, 1.0), (0.3, 4.0), (7.0, 0.5)]:
        cov = f @ f.T / alpha + torch.eye(40, dtype=torch.float64) / beta
        direct = torch.distributions.MultivariateNormal(torch.zeros(40, dtype=torch.float64), cov).log_prob(y)
        assert _evidence(f, y, alpha, beta, sigma, v) == pytest.approx(float(direct), rel=1e-9)


def test_logme_fixed_point_maximises_evidence():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(200, 6, generator=g, dtype=torch.float64)
    y = f @ torch.randn(6, generator=g, dtype=torch.float64) + 0.3 * torch.randn(200, generator=g, dtype=torch.float64)
    sigma, v = torch.linalg.eigh(f.T @ f)
    a, b = _fit_alpha_beta(f, y, sigma, v, max_iter=100, tol=1e-10)
    best = _evidence(f, y, a, b, sigma, v)
    for da, db in [(1.5, 1), (1 / 1.5, 1), (1, 1.5), (1, 1 / 1.5)]:
        assert _evidence(f, y, a * da, b * db, sigma, v) < best
    assert 1 / b == pytest.approx(0.09, rel=0.3)  # noise variance 0.3^2 recovered


def test_logme_ranks_informative_features_higher():
    g = torch.Generator().manual_seed(2)
    y = torch.randint(0, 4, (300,), generator=g)
    good = torch.nn.functional.one_hot(y, 4).float() + 0.3 * torch.randn(300, 4, generator=g)
    bad = torch.randn(300, 4, generator=g)
    assert logme(good, y) > logme(bad, y)
    assert math.isfinite(logme(bad, y))
