"""Balanced clustering of image features (MoCE, Liu et al. 2024, eq. 2 and appendix A.1).

Axis legend: N images, B a batch of features, d feature width, m clusters.

Alternates (a) the Sinkhorn-Knopp solution ``Q`` of
``max_Q Tr(Q^T A) + eps H(Q)`` subject to equal cluster sizes (rows of Q sum to 1/m,
columns to 1/n), with ``A = F^T C`` the cosine scores of unit-norm features and
centroids, and (b) SGD steps on the unit-norm centroids ``C`` minimising the cross
entropy between ``Q`` and ``softmax(A / tau)``. Sinkhorn-Knopp runs on each batch
(SwAV-style), so features can stream from disk or from a model batch by batch.

Defaults follow appendix A.1: 3 Sinkhorn iterations, SGD lr 0.1, momentum 0.9, weight
decay 0.9, 10 epochs. The paper does not give ``eps`` and ``tau``; we use SwAV's 0.05 and 0.1.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ._utils import atomic_write_bytes

__all__ = ["sinkhorn_knopp", "ClusterConfig", "Clustering", "fit_clusters", "assign_clusters"]


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, *, eps: float = 0.05, iters: int = 3) -> Tensor:
    """Entropy-regularised balanced assignment (Cuturi 2013; Asano et al. 2020; SwAV).

    Args:
        scores: ``(N, m)`` similarities ``A^T`` of N samples to m clusters.
        eps: entropy weight (smaller = sharper assignments).
        iters: alternating row/column normalisations.

    Returns:
        ``(N, m)`` soft assignments; each row sums to 1 (the last step normalises samples)
        and, at convergence, each cluster receives N/m samples in total.
    """
    n, m = scores.shape
    logits = scores.float() / eps
    q = torch.exp(logits - logits.max()).t()  # (m, N), shifted for stability
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True).clamp_min(1e-30)  # clusters: equal mass 1/m
        q /= m
        q /= q.sum(dim=0, keepdim=True).clamp_min(1e-30)  # samples: mass 1/N
        q /= n
    return (q * n).t()  # (N, m), rows sum to 1


@dataclass
class ClusterConfig:
    """Hyper-parameters of :func:`fit_clusters` (MoCE appendix A.1 defaults)."""

    num_clusters: int = 256
    epochs: int = 10
    sinkhorn_iters: int = 3
    eps: float = 0.05
    tau: float = 0.1
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.9
    batch_size: int = 1024
    seed: int = 0
    center: bool = False  # subtract the mean unit feature first (counters a dominant "hub" centroid)


@dataclass
class Clustering:
    """Learned centroids and how they were made."""

    centroids: Tensor  # (m, d), unit rows
    config: ClusterConfig
    feature_source: str = ""  # e.g. the feature extractor's checkpoint or name
    history: list | None = None
    mean: Tensor | None = None  # (d,) mean unit feature subtracted before clustering (config.center)

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[0]

    def prepare(self, features: Tensor) -> Tensor:
        """The unit vectors the centroids live with: normalise, centre (if fitted so), normalise."""
        return _prepare(features, self.mean)

    def assign(self, features: Tensor) -> Tensor:
        """Hard cluster ids ``(N,)`` of features ``(N, d)`` (normalised here): nearest centroid."""
        return assign_clusters(self.prepare(features), self.centroids)

    def assign_balanced(self, features: Tensor, *, iters: int = 50) -> Tensor:
        """Cluster ids ``(N,)`` from the Sinkhorn-Knopp assignment ``Q`` over all of ``features``
        (equal cluster sizes, as the paper takes Q for the pre-training images); new images
        such as a downstream set use :meth:`assign` (nearest centroid)."""
        scores = self.prepare(features) @ self.centroids.float().t()  # (N, m)
        return sinkhorn_knopp(scores, eps=self.config.eps, iters=iters).argmax(-1)

    def save(self, path: str | Path) -> Path:
        """Write centroids + config + feature source as one safetensors file."""
        from safetensors.torch import save

        meta = {"config": json.dumps(asdict(self.config)), "feature_source": self.feature_source,
                "history": json.dumps(self.history or [])}
        path = Path(path)
        tensors = {"centroids": self.centroids.contiguous()}
        if self.mean is not None:
            tensors["mean"] = self.mean.contiguous()
        atomic_write_bytes(path, save(tensors, metadata=meta))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Clustering:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            centroids = f.get_tensor("centroids")
            mean = f.get_tensor("mean") if "mean" in f.keys() else None
        if "config" not in meta:
            raise ValueError(f"{path} is not a visionmoe clustering file (no config metadata)")
        return cls(centroids, ClusterConfig(**json.loads(meta["config"])), meta.get("feature_source", ""),
                   json.loads(meta.get("history", "[]")), mean)


def _prepare(features: Tensor, mean: Tensor | None) -> Tensor:
    f = F.normalize(features.float(), dim=-1)
    return f if mean is None else F.normalize(f - mean.to(f.device), dim=-1)


def assign_clusters(features: Tensor, centroids: Tensor) -> Tensor:
    """``argmax_j <f_i / |f_i|, c_j>`` for each feature row."""
    return (F.normalize(features.float(), dim=-1) @ F.normalize(centroids.float(), dim=-1).t()).argmax(-1)


def _batches(features: Tensor | Callable[[], Iterable[Tensor]], batch_size: int, gen: torch.Generator):
    if callable(features):  # a streaming source: a function returning an iterable of (B, d) batches
        yield from features()
        return
    order = torch.randperm(len(features), generator=gen)
    for i in range(0, len(features), batch_size):
        yield features[order[i : i + batch_size]]


def fit_clusters(
    features: Tensor | Callable[[], Iterable[Tensor]],
    config: ClusterConfig | None = None,
    *,
    dim: int | None = None,
    init: Tensor | None = None,
    progress: bool = False,
    feature_source: str = "",
) -> Clustering:
    """Learn ``m`` balanced, unit-norm centroids for unit-norm features.

    Args:
        features: ``(N, d)`` tensor, or a function returning an iterable of ``(B, d)``
            batches (called once per epoch) for data that does not fit in memory.
        config: hyper-parameters (default :class:`ClusterConfig`).
        dim: feature width, needed only for a streaming source without ``init``.
        init: ``(m, d)`` initial centroids (default: m random features, or random unit vectors).
    """
    cfg = config or ClusterConfig()
    gen = torch.Generator().manual_seed(cfg.seed)
    if init is not None:
        c0 = init.float().clone()
    elif isinstance(features, Tensor):
        if len(features) < cfg.num_clusters:
            raise ValueError(f"{len(features)} features cannot make {cfg.num_clusters} clusters")
        c0 = features[torch.randperm(len(features), generator=gen)[: cfg.num_clusters]].float().clone()
    else:
        if dim is None:
            raise ValueError("a streaming feature source needs dim= (or init=)")
        c0 = torch.randn(cfg.num_clusters, dim, generator=gen)
    mean = None
    if cfg.center:  # one pass for the mean unit feature
        total, n = 0.0, 0
        for fb in _batches(features, cfg.batch_size, gen):
            total = total + F.normalize(fb.float(), dim=-1).sum(0)
            n += len(fb)
        mean = total / max(n, 1)
        if init is None and isinstance(features, Tensor):
            c0 = _prepare(c0, mean)
    centroids = torch.nn.Parameter(F.normalize(c0, dim=-1))
    opt = torch.optim.SGD([centroids], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    history = []
    from rich.progress import Progress

    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("clustering", total=cfg.epochs)
        for epoch in range(cfg.epochs):
            total, count = 0.0, 0
            for fb in _batches(features, cfg.batch_size, gen):
                fb = _prepare(fb, mean)  # (B, d) unit rows
                scores = fb @ centroids.t()  # (B, m)
                q = sinkhorn_knopp(scores.detach(), eps=cfg.eps, iters=cfg.sinkhorn_iters)  # (B, m)
                loss = -(q * F.log_softmax(scores / cfg.tau, dim=-1)).sum(-1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    centroids.copy_(F.normalize(centroids, dim=-1))
                total += loss.item() * len(fb)
                count += len(fb)
            history.append({"epoch": epoch + 1, "loss": total / max(count, 1)})
            bar.update(task, advance=1)
    return Clustering(centroids.detach().clone(), cfg, feature_source, history, mean)
