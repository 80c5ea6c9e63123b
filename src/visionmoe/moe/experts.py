"""Experts: E two-layer MLPs stored as stacked weights.

Axis legend: N rows routed to experts (sorted by expert), D width, H hidden, E experts.

Each expert keeps timm ``Mlp`` layout: ``fc1_weight[e]`` is ``(H, D)`` like
``Mlp.fc1.weight`` and ``fc2_weight[e]`` is ``(D, H)`` like ``Mlp.fc2.weight``, so
upcycling a dense MLP and extracting one expert are plain copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Experts"]


class Experts(nn.Module):
    """E MLPs ``fc2(act(fc1(x)))`` with stacked parameters.

    Args:
        num_experts: E.
        dim: D, input and output width.
        hidden: H, hidden width of each expert.
        act_layer: activation module class (default ``nn.GELU``, as timm's ViT).
        bias: use biases (timm's ``Mlp`` does).
        drop: dropout after the activation and after fc2 (timm ``Mlp`` semantics).
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden: int,
        *,
        act_layer: type[nn.Module] | nn.Module = nn.GELU,
        bias: bool = True,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        if num_experts < 1 or dim < 1 or hidden < 1:
            raise ValueError(f"num_experts, dim and hidden must be >= 1, got {num_experts}, {dim}, {hidden}")
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.fc1_bias = nn.Parameter(torch.zeros(num_experts, hidden)) if bias else None
        self.fc2_bias = nn.Parameter(torch.zeros(num_experts, dim)) if bias else None
        self.act = act_layer() if isinstance(act_layer, type) else act_layer
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm ViT init: truncated normal std 0.02 for weights, zero biases."""
        nn.init.trunc_normal_(self.fc1_weight, std=0.02)
        nn.init.trunc_normal_(self.fc2_weight, std=0.02)
        if self.fc1_bias is not None:
            nn.init.zeros_(self.fc1_bias)
            nn.init.zeros_(self.fc2_bias)

    def _params(self) -> tuple[tuple[Tensor, ...], ...]:
        # unbind once per forward: indexing w[e] per expert makes backward allocate E
        # zero-filled full-size gradient buffers (REFERENCE_NOTES, dispatch cost).
        w1, w2 = self.fc1_weight.unbind(0), self.fc2_weight.unbind(0)
        if self.fc1_bias is None:
            none = (None,) * self.num_experts
            return w1, none, w2, none
        return w1, self.fc1_bias.unbind(0), w2, self.fc2_bias.unbind(0)

    def expert(self, x: Tensor, e: int) -> Tensor:
        """Apply expert ``e`` to ``x: (..., D)``."""
        b1 = None if self.fc1_bias is None else self.fc1_bias[e]
        b2 = None if self.fc2_bias is None else self.fc2_bias[e]
        h = self.drop(self.act(F.linear(x, self.fc1_weight[e], b1)))
        return self.drop(F.linear(h, self.fc2_weight[e], b2))

    def forward(self, x: Tensor, counts: list[int]) -> Tensor:
        """Apply expert e to the e-th contiguous chunk of rows.

        Args:
            x: ``(N, D)`` rows sorted by expert.
            counts: E ints, rows per expert, summing to N.

        Returns:
            ``(N, D)`` expert outputs in the same order.
        """
        if len(counts) != self.num_experts:
            raise ValueError(f"counts must have {self.num_experts} entries, got {len(counts)}")
        w1, b1, w2, b2 = self._params()
        outs = []
        # Every expert runs, even on 0 rows, so all parameters get (zero) gradients:
        # DDP and optimizers see the same parameter set every step.
        for e, xe in enumerate(x.split(counts, dim=0)):
            h = self.drop(self.act(F.linear(xe, w1[e], b1[e])))  # (n_e, H)
            outs.append(self.drop(F.linear(h, w2[e], b2[e])))  # (n_e, D)
        return torch.cat(outs, dim=0)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}"
