"""Cheap transferability scores of frozen features: weighted k-NN accuracy and LogME.

Both rank candidate backbones (e.g. MoCE's per-cluster expert sets) for a downstream task
without fine-tuning them.

Axis legend: N train images, M test images, D width, C classes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["knn_accuracy", "knn_predict", "logme"]


@torch.no_grad()
def knn_predict(
    train_f: Tensor, train_y: Tensor, test_f: Tensor, *, k: int = 20, temperature: float = 0.07,
    num_classes: int | None = None, chunk: int = 1024,
) -> Tensor:
    """Class predictions ``(M,)`` by cosine k-NN with ``exp(sim / T)`` vote weights (the
    protocol of InstDisc / DINO). Features are l2-normalised here."""
    if train_f.ndim != 2 or test_f.ndim != 2 or train_f.shape[1] != test_f.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D), got {tuple(train_f.shape)} and {tuple(test_f.shape)}")
    if len(train_f) != len(train_y):
        raise ValueError(f"{len(train_f)} train features but {len(train_y)} labels")
    if len(train_f) == 0:
        raise ValueError("k-NN needs at least one training image")
    c = int(num_classes or int(train_y.max()) + 1)
    k = min(k, len(train_f))
    tr = F.normalize(train_f.float(), dim=-1)
    preds = []
    for i in range(0, len(test_f), chunk):
        sim = F.normalize(test_f[i : i + chunk].float(), dim=-1) @ tr.T  # (m, N)
        s, idx = sim.topk(k, dim=-1)  # (m, k)
        votes = torch.zeros(len(s), c).scatter_add_(1, train_y[idx].long(), (s / temperature).exp())
        preds.append(votes.argmax(-1))
    return torch.cat(preds) if preds else train_y.new_zeros(0)


def knn_accuracy(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor, **kwargs) -> float:
    """Accuracy of :func:`knn_predict` on ``(test_f, test_y)``."""
    pred = knn_predict(train_f, train_y, test_f, **kwargs)
    return float((pred == test_y.to(pred.device)).float().mean()) if len(test_y) else float("nan")


def _evidence(f: Tensor, y: Tensor, alpha: float, beta: float, sigma: Tensor, v: Tensor) -> float:
    """log N(y; 0, F F^T / alpha + I / beta) in closed form, given ``F^T F = V diag(sigma) V^T``."""
    n, d = f.shape
    m = v @ ((v.T @ (f.T @ y)) / (sigma + alpha / beta))  # posterior mean
    m2 = float(m @ m)
    res2 = float(((y - f @ m) ** 2).sum())
    return (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - 0.5 * float(torch.log(alpha + beta * sigma).sum())
            - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * math.log(2 * math.pi))


def _fit_alpha_beta(f: Tensor, y: Tensor, sigma: Tensor, v: Tensor, max_iter: int, tol: float) -> tuple[float, float]:
    """MacKay's fixed-point updates of (alpha, beta), starting from (1, 1)."""
    n = len(f)
    fty = v.T @ (f.T @ y)  # (D,) = V^T F^T y
    alpha, beta = 1.0, 1.0
    for _ in range(max_iter):
        lam = alpha / beta
        gamma = float((sigma / (sigma + lam)).sum())  # effective number of parameters
        m = v @ (fty / (sigma + lam))
        alpha = gamma / max(float(m @ m), 1e-12)
        beta = (n - gamma) / max(float(((y - f @ m) ** 2).sum()), 1e-12)
        if abs(alpha / beta - lam) / lam < tol:
            break
    return alpha, beta


@torch.no_grad()
def logme(features: Tensor, labels: Tensor, *, max_iter: int = 11, tol: float = 1e-2) -> float:
    """LogME (You et al., ICML 2021): the mean over classes of the maximised log evidence per
    image of Bayesian linear regression from the features to each one-hot label column,
    ``p(y | F, alpha, beta) = N(y; 0, F F^T / alpha + I / beta)``; higher is better.

    alpha (prior precision) and beta (noise precision) follow MacKay's fixed-point updates,
    computed in the eigenbasis of ``F^T F`` (O(N D^2 + D^3)).
    """
    f = features.double()
    if f.ndim != 2 or len(f) != len(labels):
        raise ValueError(f"features must be (N, D) with one label per row, got {tuple(f.shape)} "
                         f"and {len(labels)} labels")
    if len(f) < 2:
        raise ValueError("LogME needs at least two images")
    sigma, v = torch.linalg.eigh(f.T @ f)  # F^T F = V diag(sigma) V^T
    sigma = sigma.clamp_min(0)
    evidences = []
    for c in torch.unique(labels).tolist():
        y = (labels == c).double()
        alpha, beta = _fit_alpha_beta(f, y, sigma, v, max_iter, tol)
        evidences.append(_evidence(f, y, alpha, beta, sigma, v) / len(f))
    return float(sum(evidences) / len(evidences))
