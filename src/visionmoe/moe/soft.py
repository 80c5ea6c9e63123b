"""Soft MoE (Puigcerver et al., "From Sparse to Soft Mixtures of Experts", ICLR 2024; vmoe
``projects/soft_moe``): every expert processes ``p`` *slots*, each slot a convex combination
of all tokens of an image, and every token takes a convex combination of all slot outputs.
Nothing is dropped, no token is routed discretely, no auxiliary loss is needed.

Axis legend: B images, T tokens per image, D width, E experts, p slots per expert,
``n = E * p`` slots per image.

For each image, with ``X: (T, D)``, learned slot parameters ``Phi: (D, n)`` and a learned
scalar ``scale`` (the paper's normalisation: tokens and slot parameters l2-normalised over
D, then scaled, which keeps the logits well conditioned at any width)::

    logits   = scale * normalize(X) @ normalize(Phi)   # (T, n)
    dispatch = softmax(logits, over tokens)             # each slot: a mix of the tokens
    combine  = softmax(logits, over all n slots)        # each token: a mix of the slots
    slots    = dispatch^T @ X                           # (n, D)
    Y        = combine @ expert_of_slot(slots)          # (T, D)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .experts import Experts
from .layer import MoE, MoEResult
from .routers import register_router

__all__ = ["SoftRouter", "SoftMoE"]


def _normalize(x: Tensor, dim: int, eps: float = 1e-6) -> Tensor:
    return x * torch.rsqrt(x.pow(2).sum(dim=dim, keepdim=True) + eps)


@register_router("soft")
class SoftRouter(nn.Module):
    """The slot parameters of a Soft MoE layer: ``phi: (D, E * p)`` and a scalar ``scale``
    (init 1). :meth:`forward` gives the ``(B, T, E * p)`` logits."""

    level = "image"  # the unit is one image (its tokens are mixed into slots)
    needs_key = False

    def __init__(self, dim: int, num_experts: int, slots_per_expert: int = 1, *, normalize: bool = True,
                 noise_std: float = 0.0) -> None:
        super().__init__()
        if num_experts < 1 or slots_per_expert < 1:
            raise ValueError(f"Soft MoE needs num_experts >= 1 and slots_per_expert >= 1, got {num_experts} and "
                             f"{slots_per_expert}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.dim, self.num_experts, self.slots_per_expert = dim, num_experts, slots_per_expert
        self.normalize, self.noise_std = normalize, float(noise_std)
        self.phi = nn.Parameter(torch.randn(dim, num_experts * slots_per_expert) / dim ** 0.5)  # LeCun normal
        self.scale = nn.Parameter(torch.ones(()))

    @property
    def k(self) -> int:  # every expert sees every image
        return self.num_experts

    @property
    def base(self) -> SoftRouter:
        """The module holding the gate's parameters: this one (the router contract)."""
        return self

    def forward(self, x: Tensor) -> Tensor:
        if self.normalize:
            x, phi = _normalize(x.float(), -1), _normalize(self.phi.float(), 0)
            logits = self.scale * (x @ phi)
        else:
            logits = x.float() @ self.phi.float()
        if self.training and self.noise_std > 0:
            logits = logits + self.noise_std * torch.randn_like(logits)
        return logits  # (B, T, n)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, slots_per_expert={self.slots_per_expert}, "
                f"normalize={self.normalize}")


class SoftMoE(MoE):
    """A Soft MoE layer with the :class:`~visionmoe.moe.MoE` contract ``(B, ..., D) -> (B, ..., D)``
    (all positions of an image form its token set: ``(B, T, D)`` for a ViT, ``(B, H, W, C)``
    for ConvNeXt). ``last`` records, per expert, the slots it processed (``B * p``) and the
    mean combine weight each image gives it; nothing is ever dropped."""

    def __init__(self, *, router: SoftRouter, experts: Experts, shared_expert: nn.Module | None = None) -> None:
        super().__init__(router=router, experts=experts, shared_expert=shared_expert)
        self.dispatcher = None  # no discrete dispatch

    def forward(self, x: Tensor, key: Tensor | None = None) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"MoE expects inputs of width D={self.dim}, got shape {tuple(x.shape)}")
        if x.dim() < 3:
            raise ValueError(f"Soft MoE mixes the tokens of each image: it needs (B, T, D) or (B, H, W, C) inputs, "
                             f"got shape {tuple(x.shape)}")
        shape = x.shape
        tokens = x.reshape(shape[0], -1, self.dim)  # (B, T, D)
        b, _, d = tokens.shape
        e, p = self.num_experts, self.router.slots_per_expert
        logits = self.router(tokens)  # (B, T, n)
        dispatch = logits.softmax(dim=1).to(tokens.dtype)  # over the tokens
        combine = logits.softmax(dim=2).to(tokens.dtype)  # over all slots
        slots = dispatch.transpose(1, 2) @ tokens  # (B, n, D)
        rows = slots.view(b, e, p, d).transpose(0, 1).reshape(e * b * p, d)  # grouped by expert
        ys = self.experts(rows, [b * p] * e).view(e, b, p, d).transpose(0, 1).reshape(b, e * p, d)
        y = (combine @ ys).reshape(shape)
        if self.shared_expert is not None:
            y = y + self.shared_expert(x)
        self.last = self._record_soft(combine.detach(), b, p)
        return y

    def _record_soft(self, combine: Tensor, b: int, p: int) -> MoEResult:
        e = self.num_experts
        share = combine.float().view(b, -1, e, p).sum(-1).mean(1)  # (B, E): mean combine weight per expert
        entropy = -(combine.float() * combine.float().clamp_min(1e-12).log()).sum(-1).mean()
        counts = torch.full((e,), b * p, dtype=torch.long, device=combine.device)
        zero = combine.new_zeros((), dtype=torch.float32)
        return MoEResult(aux_loss=zero, aux={}, expert_counts=counts, kept_counts=counts,
                         dropped_fraction=zero, gate_entropy=entropy,
                         indices=torch.arange(e, device=combine.device).expand(b, e), weights=share,
                         kept=torch.ones(b, e, dtype=torch.bool, device=combine.device), probs=share,
                         level="image", tokens_per_unit=1, extra={"slots_per_expert": p})

    def extra_repr(self) -> str:
        return f"soft, slots_per_expert={self.router.slots_per_expert}"
