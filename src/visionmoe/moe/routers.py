"""Routers: choose K of E experts for each token, or for each whole image.

Axis legend: S routed units (tokens, or images for image-level routers), B images,
T tokens per image, D width, E experts, K top-k.

Token-level routers (``level == "token"``) take ``x: (S, D)``. Image-level routers
(``level == "image"``) take ``x: (B, T, D)`` plus an optional routing ``key: (B,)`` and
choose the experts of every token of an image together. All return a
:class:`RouterOutput`.

Gating follows V-MoE (google-research/vmoe ``NoisyTopExpertsPerItemRouter``): in
training with ``noise_std > 0`` the logits get Gaussian noise of std ``noise_std / E``;
gates are ``softmax(noisy logits)``; the top-k gate values are the combine weights,
*not* renormalised unless ``renormalize=True``.

Every gate type (linear, cosine, L2, pooled, cluster) also selects in two other ways:

- ``selection="expert_choice"`` (Zhou et al. 2022; vmoe ``NoisyTopItemsPerExpertRouter``):
  each expert takes its top ``C = ceil(capacity_factor * S / E)`` units by gate probability,
  so a unit gets 0..E experts and no expert is over- or under-loaded; the output lists every
  expert per unit (K = E, best first) with ``chosen`` marking the assignments taken.
- ``balance="loss_free"`` (DeepSeek-V3; torchtitan's ``expert_bias``): a per-expert bias is
  added to the scores for the top-k *selection* only, never to the combine weights, and moved
  after every optimizer step by ``rate * sign(mean load - load)``
  (:func:`update_balance_biases`); ``score="sigmoid"`` gates with sigmoids normalised over
  the chosen k.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gating import (
    AUX_LOSS_NAMES,
    BALANCES,
    DEFAULT_AUX_WEIGHTS,
    LEVELS,
    ROUTERS,
    SCORES,
    SELECTIONS,
    Level,
    Router,
    RouterLike,
    RouterOutput,
    register_router,
)

__all__ = [
    "RouterOutput",
    "Router",
    "RouterLike",
    "Level",
    "LEVELS",
    "LinearRouter",
    "CosineRouter",
    "L2Router",
    "PooledRouter",
    "ClusterRouter",
    "TaskRouter",
    "DEFAULT_AUX_WEIGHTS",
    "SELECTIONS",
    "BALANCES",
    "SCORES",
    "update_balance_biases",
    "ROUTERS",
    "register_router",
    "AUX_LOSS_NAMES",
]


@register_router("linear")
class LinearRouter(Router):
    """``logits = x W_g`` (no bias), V-MoE's router."""

    def __init__(self, dim: int, num_experts: int, k: int = 1, **kwargs) -> None:
        super().__init__(num_experts, k, **kwargs)
        self.dim = dim
        self.proj = nn.Linear(dim, num_experts, bias=False)
        nn.init.normal_(self.proj.weight, std=0.02)

    def compute_logits(self, x: Tensor, key: Tensor | None = None) -> Tensor:
        return self.proj(x)  # (S, D) -> (S, E)


@register_router("cosine")
class CosineRouter(Router):
    """Cosine router (X-MoE, Chi et al. 2022; Tutel ``CosineTopKGate``):
    ``logits = <norm(x W_p), norm(e_j)> * scale`` with a learned temperature.

    The scale is ``exp(log_scale)`` clamped to at most ``max_scale`` (default 100).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        k: int = 1,
        *,
        proj_dim: int = 256,
        init_temperature: float = 0.07,
        max_scale: float = 100.0,
        **kwargs,
    ) -> None:
        super().__init__(num_experts, k, **kwargs)
        self.dim = dim
        proj_dim = min(proj_dim, dim)
        self.proj = nn.Linear(dim, proj_dim, bias=False)
        self.expert_embed = nn.Parameter(torch.empty(num_experts, proj_dim))
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_log_scale = math.log(max_scale)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.orthogonal_(self.expert_embed)

    def compute_logits(self, x: Tensor, key: Tensor | None = None) -> Tensor:
        h = F.normalize(self.proj(x), dim=-1)  # (S, P)
        e = F.normalize(self.expert_embed, dim=-1)  # (E, P)
        scale = self.log_scale.clamp(max=self.max_log_scale).exp()
        return scale * (h @ e.t())  # (S, E)


@register_router("l2")
class L2Router(Router):
    """L2 gate (Sweet-spot paper §4.3.5: "identical to the Cos gate, except that it employs the
    L2-distance"): a linear projection into the same ``proj_dim``-dimensional space as
    :class:`CosineRouter`, then ``logits = -scale * ||x W_p - c_e||^2`` to learned codes
    ``c_e``. ``scale`` defaults to ``1/sqrt(proj_dim)`` so the softmax does not saturate at
    initialisation.
    """

    def __init__(self, dim: int, num_experts: int, k: int = 1, *, proj_dim: int = 256, scale: float | None = None,
                 **kwargs):
        super().__init__(num_experts, k, **kwargs)
        self.dim = dim
        proj_dim = min(proj_dim, dim)
        self.proj = nn.Linear(dim, proj_dim, bias=False)
        self.centers = nn.Parameter(torch.randn(num_experts, proj_dim) * 0.02)
        self.scale = 1.0 / math.sqrt(proj_dim) if scale is None else scale
        nn.init.normal_(self.proj.weight, std=0.02)

    def compute_logits(self, x: Tensor, key: Tensor | None = None) -> Tensor:
        h = self.proj(x)  # (S, P)
        d2 = h.pow(2).sum(-1, keepdim=True) - 2 * h @ self.centers.t() + self.centers.pow(2).sum(-1)  # (S, E)
        return -self.scale * d2


class PooledRouter(nn.Module):
    """Image-level router: route every token of an image by one vector per image.

    ``pool="cls"`` takes token ``token_index`` (the CLS token, ViMoE's image-level routing);
    ``pool="mean"`` averages the tokens (for backbones without a CLS token, e.g. ConvNeXt).
    The pooled ``(B, D)`` vectors go through any token router (linear, cosine, L2).
    """

    level: Level = "image"
    needs_key = False

    def __init__(self, router: Router, *, pool: str = "cls", token_index: int = 0) -> None:
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.router = router
        self.pool = pool
        self.token_index = token_index

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def k(self) -> int:
        return self.router.k

    @property
    def base(self) -> Router:
        """The token router that gates the pooled vectors."""
        return self.router

    def forward(self, x: Tensor, key: Tensor | None = None) -> RouterOutput:
        if x.dim() != 3:
            raise ValueError(f"image-level routing needs x of shape (B, T, D), got {tuple(x.shape)}")
        pooled = x[:, self.token_index] if self.pool == "cls" else x.mean(dim=1)  # (B, D)
        return self.router(pooled)

    def extra_repr(self) -> str:
        return f"pool={self.pool!r}"


class ClusterRouter(Router):
    """MoCE cluster-conditional gate (Liu et al. 2024, eq. 4):
    ``G(x) = TopK(softmax(W_g C[x] + eps))``.

    ``C`` is a learned cluster-embedding table ``(num_keys, embed_dim)``, optionally
    initialised from clustering centroids; ``key`` holds each image's cluster id. The
    noise ``eps`` is V-MoE's (``noise_std / E``). All tokens of an image follow its cluster.
    """

    level = "image"
    needs_key = True
    key_name = "cluster"

    def __init__(
        self,
        num_keys: int,
        num_experts: int,
        k: int = 1,
        *,
        embed_dim: int | None = None,
        centroids: Tensor | None = None,
        **kwargs,
    ) -> None:
        super().__init__(num_experts, k, **kwargs)
        if num_keys < 1:
            raise ValueError(f"number of {self.key_name}s must be >= 1, got {num_keys}")
        if centroids is not None:
            num_keys, embed_dim = centroids.shape
        embed_dim = embed_dim or max(num_experts, 16)
        self.num_keys = num_keys
        self.embed = nn.Embedding(num_keys, embed_dim)
        self.proj = nn.Linear(embed_dim, num_experts, bias=False)
        nn.init.normal_(self.proj.weight, std=0.02)
        if centroids is not None:
            with torch.no_grad():
                self.embed.weight.copy_(centroids)

    def compute_logits(self, x: Tensor, key: Tensor | None = None) -> Tensor:
        if key is None:
            raise ValueError(
                f"{type(self).__name__} routes by {self.key_name} id: pass routing_key=<(B,) long tensor>"
            )
        key = torch.as_tensor(key, device=self.embed.weight.device).reshape(-1).long()
        if x.dim() >= 1 and x.shape[0] != key.shape[0]:
            raise ValueError(f"routing_key has {key.shape[0]} entries for a batch of {x.shape[0]} images")
        if key.numel() and (key.min() < 0 or key.max() >= self.num_keys):
            raise ValueError(
                f"{self.key_name} ids must be in [0, {self.num_keys}), got [{int(key.min())}, {int(key.max())}]"
            )
        return self.proj(self.embed(key))  # (B, E)

    def extra_repr(self) -> str:
        return f"num_{self.key_name}s={self.num_keys}, " + super().extra_repr()


class TaskRouter(ClusterRouter):
    """Route whole images by a task id through a learned task-embedding table."""

    key_name = "task"


def update_balance_biases(model: nn.Module, group=None) -> int:
    """Move the selection bias of every loss-free-balanced router of ``model`` (call after each
    optimizer step; the :class:`~visionmoe.train.Trainer` does). Returns how many moved."""
    n = 0
    for m in model.modules():
        if isinstance(m, Router) and m.balance == "loss_free":
            m.update_balance_bias(group)
            n += 1
    return n
