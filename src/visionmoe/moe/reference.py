"""Reference dispatchers: the two ways most research code dispatches tokens, kept as
baselines for ``visionmoe bench`` and as independent implementations in the tests.

Axis legend: S units, K top-k, E experts, C capacity, D width. Both follow the
:class:`~visionmoe.moe.dispatch.SortedDispatcher` interface ``(x, route, experts) -> (y, info)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dispatch import DispatchInfo, compute_capacity
from .experts import Experts
from .routers import RouterOutput

__all__ = ["LoopDispatcher", "EinsumDispatcher"]


class LoopDispatcher(nn.Module):
    """Per-expert Python loop with ``index_select`` / ``index_add`` (dropless): the
    "typical research code" baseline. Token-level routing only."""

    def forward(self, x: Tensor, route: RouterOutput, experts: Experts) -> tuple[Tensor, DispatchInfo]:
        num_units, k = route.indices.shape
        y = torch.zeros_like(x)
        counts = torch.bincount(route.indices.reshape(-1), minlength=experts.num_experts)
        for e in range(experts.num_experts):
            unit, choice = (route.indices == e).nonzero(as_tuple=True)  # (n_e,), (n_e,)
            out = experts.expert(x.index_select(0, unit), e)  # (n_e, D)
            y = y.index_add(0, unit, out * route.weights[unit, choice].unsqueeze(-1).to(x.dtype))
        kept = torch.ones(num_units, k, dtype=torch.bool, device=x.device)
        return y, DispatchInfo(counts, counts.clone(), kept, None)


class EinsumDispatcher(nn.Module):
    """GShard-style dispatch with one-hot ``(S, E, C)`` dispatch/combine tensors and einsums
    (Lepikhin et al. 2020; also Tutel's and many V-MoE ports' reference path).

    Capacity ``C = ceil(K * S * capacity_factor / E)``; first choices of all units are placed
    before second choices, units in position order (no BPR). Memory grows as S * E * C.
    """

    def __init__(self, capacity_factor: float = 1.25) -> None:
        super().__init__()
        self.capacity_factor = capacity_factor

    def forward(self, x: Tensor, route: RouterOutput, experts: Experts) -> tuple[Tensor, DispatchInfo]:
        num_units, k = route.indices.shape
        num_experts = experts.num_experts
        cap = compute_capacity(num_units, k, num_experts, self.capacity_factor)
        combine = x.new_zeros(num_units, num_experts, cap)  # (S, E, C)
        filled = torch.zeros(num_experts, dtype=torch.long, device=x.device)
        kept = torch.zeros(num_units, k, dtype=torch.bool, device=x.device)
        for choice in range(k):
            onehot = F.one_hot(route.indices[:, choice], num_experts)  # (S, E)
            pos = onehot.cumsum(0) - 1 + filled  # (S, E) slot of each unit in its expert
            slot = (pos * onehot).sum(-1)  # (S,)
            ok = slot < cap
            kept[:, choice] = ok
            mask = onehot * ok.unsqueeze(-1)  # (S, E)
            combine = combine + (route.weights[:, choice].to(x.dtype).view(-1, 1, 1) * mask.unsqueeze(-1)
                                 * F.one_hot(slot.clamp(max=cap - 1), cap).unsqueeze(1))
            filled = filled + onehot.sum(0)
        dispatch = (combine > 0).to(x.dtype)  # (S, E, C)
        xe = torch.einsum("sec,sd->ecd", dispatch, x)  # (E, C, D)
        h = experts.act(torch.baddbmm(experts.fc1_bias.unsqueeze(1), xe, experts.fc1_weight.transpose(1, 2)))
        ye = torch.baddbmm(experts.fc2_bias.unsqueeze(1), h, experts.fc2_weight.transpose(1, 2))  # (E, C, D)
        y = torch.einsum("sec,ecd->sd", combine, ye)
        counts = torch.bincount(route.indices.reshape(-1), minlength=num_experts)
        kept_counts = counts.clamp(max=cap)
        return y, DispatchInfo(counts, kept_counts, kept, cap)
