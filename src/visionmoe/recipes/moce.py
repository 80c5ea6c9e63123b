"""MoCE (Liu et al. 2024): Mixture of Cluster-conditional Experts for task-customised MAE.

Glue over the library: a dense MAE encoder gives unit-norm image features; balanced
clustering (:mod:`visionmoe.clustering`) gives centroids; the MoCE model is the MAE
encoder with the MLPs of the chosen blocks upcycled into experts (plus a small
perturbation) behind a cluster-conditional gate ``TopK(softmax(W_g C[x] + eps))`` whose
embedding table starts from the centroids; it trains with the MAE loss, the imbalance loss
(eq. 5, in the router's auxiliary losses) and a distillation loss towards the frozen dense
encoder (eq. 3). Deployment assigns a downstream set's images to clusters, takes the
largest cluster and extracts a plain dense ViT holding that cluster's experts.

Axis legend: B images, T tokens, D width, m clusters, E experts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..clustering import Clustering
from ..eval import extract_features
from ..models import VisionTransformer
from ..moe.losses import distillation_loss
from ..moe.routers import ClusterRouter
from ..moe.upcycle import upcycle_state_dict
from ..objectives import MAEObjective

__all__ = ["build_moce", "build_sdr", "MoCEObjective", "ClusterSelection", "select_cluster", "deploy", "expert_choices",
           "distinct_candidates", "score_candidates", "SELECTION_SCORES"]


def build_moce(
    mae_encoder: VisionTransformer,
    clustering: Clustering,
    *,
    blocks: list[int],
    num_experts: int = 8,
    top_k: int = 1,
    noise: float = 0.01,
    imbalance_weight: float = 0.01,
    noise_std: float | None = None,
    renormalize: bool = False,
    seed: int = 0,
) -> VisionTransformer:
    """The MoCE model: ``mae_encoder`` with experts in ``blocks`` (copies of its MLPs plus
    ``noise`` relative perturbation), cluster-conditional gates initialised from the
    centroids, imbalance loss weight ``imbalance_weight`` (paper: all regularisers 0.01).

    With ``renormalize=False`` (eq. 1 as written) an expert's output is scaled by its gate
    value, so the model starts away from the MAE encoder (gates near 1/E); with
    ``renormalize=True`` and K = 1 the weight is 1 in value and, with ``noise=0``, the MoCE model
    starts exactly equal to the encoder, while the gate still gets the MAE and distillation
    losses' gradient (through ``log p``: see :class:`~visionmoe.moe.routers.LinearRouter`).
    ``noise_std``: the router's convention (std ``noise_std / E``); ``None`` is eq. 4's
    ``eps ~ N(0, 1/E)``, i.e. ``noise_std = sqrt(E)``.
    """
    if noise_std is None:
        noise_std = float(num_experts) ** 0.5
    if clustering.centroids.shape[1] != mae_encoder.embed_dim:
        raise ValueError(f"centroids have width {clustering.centroids.shape[1]} but the encoder has "
                         f"{mae_encoder.embed_dim}; cluster features of this encoder")
    moe = dict(num_experts=num_experts, top_k=top_k, placement=list(blocks), routing="cluster",
               num_keys=clustering.num_clusters, key_dim=mae_encoder.embed_dim, noise_std=noise_std,
               renormalize=renormalize,
               aux_weights={"imbalance": imbalance_weight})
    model = VisionTransformer(moe=moe, **mae_encoder.init_kwargs)
    sd = upcycle_state_dict(mae_encoder.state_dict(), model.moe_blocks, num_experts, noise=noise, seed=seed)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    bad = [k for k in missing if ".mlp.router." not in k]
    if bad or unexpected:  # pragma: no cover - guarded by construction
        raise RuntimeError(f"MoCE build mismatch: missing {bad}, unexpected {unexpected}")
    with torch.no_grad():
        for _, layer in model.moe_layers():
            layer.router.embed.weight.copy_(clustering.centroids)
    return model.to(mae_encoder.patch_embed.proj.weight.device)


def build_sdr(
    mae_encoder: VisionTransformer,
    clustering: Clustering,
    *,
    blocks: list[int],
    num_experts: int = 8,
    noise: float = 0.01,
    seed: int = 0,
) -> VisionTransformer:
    """The SDR(ViT) baseline of MoCE Table 3 (Liu et al. 2022, re-implemented in ViT as the
    MoCE paper does): the MoCE architecture, but each data subset (cluster) goes to an expert
    drawn at random and fixed before training (in every MoE block independently, balanced:
    each expert gets ``num_clusters / num_experts`` subsets) instead of through a learned
    cluster-conditional gate. The gates are frozen; a subset's images train only its experts.
    Deploy with :func:`deploy` like MoCE; the SDR recipe picks the subnet by brute force."""
    model = build_moce(mae_encoder, clustering, blocks=blocks, num_experts=num_experts, noise=noise,
                       imbalance_weight=0.0, renormalize=True, noise_std=0.0, seed=seed)
    g = torch.Generator().manual_seed(seed + 4242)
    n = clustering.num_clusters
    with torch.no_grad():
        for _, layer in model.moe_layers():
            r = layer.router
            if r.embed.weight.shape[1] < num_experts:
                raise ValueError(f"SDR needs a key embedding of at least {num_experts} dims")
            mapping = (torch.arange(n) % num_experts)[torch.randperm(n, generator=g)]  # subset -> expert
            r.embed.weight.zero_()
            r.embed.weight[torch.arange(n), mapping] = 10.0  # logits 10 for its expert, 0 for the rest
            r.proj.weight.copy_(torch.eye(num_experts, r.embed.weight.shape[1]))
            r.requires_grad_(False)
    return model


class MoCEObjective(MAEObjective):
    """MAE loss on a MoCE model plus ``distill_weight * ||tokens - teacher tokens||^2``
    (eq. 3) with the frozen dense encoder as teacher, on the same visible patches."""

    def __init__(self, model: nn.Module, teacher: nn.Module, *, distill_weight: float = 0.01, **mae_kwargs) -> None:
        super().__init__(model, **mae_kwargs)
        self.teacher = [copy.deepcopy(teacher).eval().requires_grad_(False)]  # a list: not a submodule
        self.distill_weight = distill_weight

    def forward(self, model: nn.Module, batch, routing_key: Tensor | None = None) -> dict[str, Tensor]:
        imgs = batch[0]
        key = routing_key if routing_key is not None else (batch[2] if len(batch) > 2 else None)
        out = self.reconstruct(model, imgs, key)
        recon = self.masked_loss(out)
        result = {"loss": recon, "recon_loss": recon.detach()}
        if self.distill_weight:
            with torch.no_grad():
                t_tokens = self.teacher[0].forward_visible(imgs, out["ids_keep"])
            distill = distillation_loss(out["tokens"], t_tokens)
            result["loss"] = recon + self.distill_weight * distill
            result["distill_loss"] = distill.detach()
        return result


@dataclass
class ClusterSelection:
    """Which cluster a downstream set maps to."""

    cluster: int
    histogram: Tensor  # (m,) images per cluster
    share: float  # fraction of the downstream images in the chosen cluster


@torch.no_grad()
def select_cluster(encoder: nn.Module, clustering: Clustering, x: Tensor, *, pool: str = "mean") -> ClusterSelection:
    """Assign the downstream images ``x`` to clusters with the dense MAE encoder's features and
    the learned centroids; pick the largest cluster (MoCE deployment)."""
    ids = clustering.assign(extract_features(encoder, x, pool=pool))
    hist = torch.bincount(ids, minlength=clustering.num_clusters)
    c = int(hist.argmax())
    return ClusterSelection(c, hist, float(hist[c]) / max(len(ids), 1))


def deploy(moce_model: VisionTransformer, cluster: int) -> VisionTransformer:
    """The plain dense ViT holding the experts (and combine weights) ``cluster`` routes to;
    it computes the same features as the MoCE model for images of that cluster."""
    for _, layer in moce_model.moe_layers():
        if not isinstance(layer.router, ClusterRouter):
            raise ValueError("deploy needs a MoCE model (cluster-conditional routers)")
    return moce_model.extract_dense(key=cluster)


@torch.no_grad()
def expert_choices(moce_model: VisionTransformer) -> dict[int, tuple[tuple[int, ...], ...]]:
    """Cluster id -> the experts its gates pick in each MoE block (top-k, in block order)."""
    choices: dict[int, list] = {}
    for _, layer in moce_model.moe_layers():
        r = layer.router
        if not isinstance(r, ClusterRouter):
            raise ValueError("expert_choices needs a MoCE model (cluster-conditional routers)")
        was = r.training
        r.eval()
        out = r(torch.zeros(r.num_keys, 1, 1), torch.arange(r.num_keys))
        r.train(was)
        for key, experts in enumerate(out.indices.reshape(r.num_keys, -1).tolist()):
            choices.setdefault(key, []).append(tuple(experts))
    return {k: tuple(v) for k, v in choices.items()}


def distinct_candidates(moce_model: VisionTransformer, cluster_sizes: Tensor | None = None) -> list[int]:
    """One cluster per distinct expert choice (the largest cluster of each group when
    ``cluster_sizes`` is given): the dense models worth comparing in a selection search."""
    groups: dict[tuple, list[int]] = {}
    for key, choice in expert_choices(moce_model).items():
        groups.setdefault(choice, []).append(key)
    if cluster_sizes is None:
        return sorted(g[0] for g in groups.values())
    return sorted(max(g, key=lambda k: int(cluster_sizes[k])) for g in groups.values())


SELECTION_SCORES = ("knn", "logme")


def score_candidates(
    moce_model: VisionTransformer,
    clusters: list[int],
    x_train: Tensor,
    y_train: Tensor,
    *,
    method: str = "knn",
    val_fraction: float = 0.2,
    seed: int = 0,
    k: int = 20,
) -> dict[int, float]:
    """Score each cluster's deployed dense model on a downstream set without fine-tuning:
    ``"knn"`` = weighted k-NN accuracy of its frozen features on a held-out ``val_fraction``
    of ``(x_train, y_train)``; ``"logme"`` = LogME of its features. Higher is better.
    (Fine-tuning based searches, early-stop and exhaustive, need a trainer; the MoCE demo
    runs them.)"""
    from ..eval import knn_accuracy, logme

    if method not in SELECTION_SCORES:
        raise ValueError(f"method must be one of {SELECTION_SCORES}, got {method!r}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x_train), generator=g)
    n_val = max(1, round(len(perm) * val_fraction))
    val, tr = perm[:n_val], perm[n_val:]
    scores = {}
    for cl in clusters:
        f = extract_features(deploy(moce_model, cl), x_train)
        if method == "knn":
            scores[cl] = knn_accuracy(f[tr], y_train[tr], f[val], y_train[val], k=k)
        else:
            scores[cl] = logme(f, y_train)
    return scores
