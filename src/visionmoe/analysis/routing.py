"""Which experts the images of each class use: the class-by-expert routing table of every
MoE block, and a one-number summary of routing collapse.

Axis legend: C classes, E experts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["class_expert_table", "dominant_expert_share", "collect_routing", "distinct_experts", "cdf",
           "patches_per_expert",
           "expert_similarity", "routing_degree", "routing_paths"]


@torch.no_grad()
def class_expert_table(model: nn.Module, x: Tensor, y: Tensor, num_classes: int, *,
                       routing_key: Tensor | None = None, batch_size: int = 256) -> dict[int, Tensor]:
    """For each MoE block: ``(C, E)`` share of each class's tokens sent to each expert (first
    choice). Image-level routers count every token of the image. ``routing_key``: per-image
    cluster/task ids for keyed routers."""
    was = model.training
    model.eval()
    tables: dict[int, Tensor] = {}
    for i in range(0, len(x), batch_size):
        kw = {"routing_key": routing_key[i : i + batch_size]} if routing_key is not None else {}
        model.forward_features(x[i : i + batch_size], **kw)
        yb = y[i : i + batch_size]
        for blk, rec in model.routing().items():
            top1 = rec.indices[:, 0]
            per_unit = rec.tokens_per_unit if rec.level == "image" else 1
            labels = yb.repeat_interleave(top1.numel() // len(yb)) if rec.level == "token" else yb
            t = tables.setdefault(blk, torch.zeros(num_classes, rec.probs.shape[-1]))
            t.index_put_((labels, top1), torch.full_like(top1, per_unit, dtype=torch.float32), accumulate=True)
    model.train(was)
    return {b: t / t.sum(1, keepdim=True).clamp_min(1) for b, t in tables.items()}


def dominant_expert_share(table: Tensor) -> float:
    """Largest fraction of classes whose most-used expert is the same expert: 1.0 when one
    expert dominates every class (collapse, MoCE Fig. 3a), about ``1/E`` when classes spread."""
    dominant = table.argmax(dim=1)  # (C,)
    return float(torch.bincount(dominant, minlength=table.shape[1]).max()) / len(dominant)


@torch.no_grad()
def collect_routing(model: nn.Module, x: Tensor, *, routing_key: Tensor | None = None,
                    batch_size: int = 256) -> dict[int, dict[str, Tensor]]:
    """Run ``model`` over ``x`` and keep, per MoE block, ``counts`` ``(N, E)`` (tokens of each
    image sent to each expert, all K choices, image-level routes count every token) and
    ``top1`` ``(N, T)`` (each token's first-choice expert; one column for image-level routes) and
    ``kept`` ``(N,)`` (share of each image's (unit, choice) assignments that capacity kept)."""
    was = model.training
    model.eval()
    out: dict[int, dict[str, list]] = {}
    for i in range(0, len(x), batch_size):
        kw = {"routing_key": routing_key[i : i + batch_size]} if routing_key is not None else {}
        xb = x[i : i + batch_size]
        model.forward_features(xb, **kw)
        for blk, rec in model.routing().items():
            b = len(xb)
            e = rec.probs.shape[-1]
            idx = rec.indices.reshape(b, -1, rec.indices.shape[-1])  # (B, T or 1, K)
            weight = rec.tokens_per_unit if rec.level == "image" else 1
            counts = torch.zeros(b, e).scatter_add_(1, idx.reshape(b, -1), torch.full(idx.reshape(b, -1).shape,
                                                                                          float(weight)))
            d = out.setdefault(blk, {"counts": [], "top1": [], "kept": []})
            d["counts"].append(counts)
            d["top1"].append(idx[..., 0])
            kept = rec.kept if rec.kept is not None else torch.ones_like(rec.indices, dtype=torch.bool)
            d["kept"].append(kept.reshape(b, -1).float().mean(-1))  # (B,) kept share of the image's choices
    model.train(was)
    return {blk: {k: torch.cat(v) for k, v in d.items()} for blk, d in out.items()}


def distinct_experts(counts: Tensor) -> Tensor:
    """``(N, E)`` counts -> ``(N,)`` number of experts each image uses."""
    return (counts > 0).sum(-1)


def patches_per_expert(counts: Tensor) -> list[tuple[Tensor, Tensor]]:
    """The Sweet-spot paper's Fig. 8: for each expert, the empirical CDF (:func:`cdf`) of the
    number of patches of an image routed to it, over the images on which it is active
    (``counts: (N, E)`` tokens of each image on each expert). Empty tensors for an expert no
    image uses."""
    out = []
    for e in range(counts.shape[1]):
        c = counts[:, e]
        c = c[c > 0]
        out.append(cdf(c) if len(c) else (c, c.float()))
    return out


def cdf(values: Tensor) -> tuple[Tensor, Tensor]:
    """Empirical CDF: sorted distinct values and the fraction of entries ``<=`` each."""
    v, c = torch.unique(values, return_counts=True)
    return v, c.cumsum(0).float() / len(values)


def expert_similarity(counts: Tensor) -> Tensor:
    """The Sweet-spot paper's expert similarity ``(E, E)``: over images using both experts,
    sum of ``c_i + c_j - |c_i - c_j|``, divided by the sum over images using either of
    ``c_i + c_j`` (``c``: tokens of the image on each expert). 1 on the diagonal of used
    experts; 0 for experts never used by the same image."""
    c = counts.float()
    ci, cj = c[:, :, None], c[:, None, :]  # (N, E, 1), (N, 1, E)
    both = (ci > 0) & (cj > 0)
    either = (ci > 0) | (cj > 0)
    num = ((ci + cj - (ci - cj).abs()) * both).sum(0)
    den = ((ci + cj) * either).sum(0)
    return num / den.clamp_min(1e-12)


def routing_degree(num_experts: int, k: int, layers: int) -> int:
    """Number of distinct routing paths a token can take: ``C(N, k) ** L`` (ViMoE)."""
    return math.comb(num_experts, k) ** layers


def routing_paths(top1: dict[int, Tensor]) -> dict[str, float]:
    """Measured paths from :func:`collect_routing`'s ``top1`` of every block: the mean number
    of distinct first-choice paths (tuples over blocks) among the tokens of an image, and the
    number of distinct image-level paths (the tuple of each block's most used expert)."""
    blocks = sorted(top1)
    n = len(top1[blocks[0]])
    t = max(v.shape[1] for v in top1.values())
    paths = torch.stack([top1[b].expand(n, t) if top1[b].shape[1] == 1 else top1[b] for b in blocks], -1)  # (N,T,L)
    per_image = [len(torch.unique(p, dim=0)) for p in paths]
    image_paths = torch.stack([top1[b].mode(dim=1).values for b in blocks], -1)  # (N, L)
    return {"mean_paths_per_image": sum(per_image) / n, "distinct_image_paths": len(torch.unique(image_paths, dim=0))}
