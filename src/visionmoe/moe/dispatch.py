"""Dispatch: send routed units to their experts and combine the results.

Axis legend: S units (tokens, or whole images for image-level routing), K top-k,
E experts, C capacity per expert (in units), N kept assignments, D width,
P the payload of one unit (``(D,)`` for a token, ``(T, D)`` for an image).

The default :class:`SortedDispatcher` never builds ``(S, E, C)`` one-hot tensors. It
sorts the ``K * S`` (unit, choice) assignments by the unique int64 key
``expert * K*S + priority`` (no stable sort needed, which also keeps it ONNX-exportable),
so each expert's assignments become one contiguous, priority-ordered run; an
assignment is kept iff its position in that run is below the capacity C. Priority
follows V-MoE: every unit's first choice comes before any second choice; within one
choice rank, units come in position order, or with Batch Prioritized Routing (BPR) in
descending order of their largest gate probability. A dropped assignment contributes
nothing (the residual connection carries the token). With ``capacity_factor=None``
nothing is dropped (dropless) and the same code path runs with C = infinity, so
capacity-limited and dropless dispatch give identical outputs when nothing is dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .experts import Experts
from .losses import expert_counts
from .routers import RouterOutput

__all__ = ["DispatchInfo", "SortedDispatcher", "compute_capacity", "kept_assignments"]


def compute_capacity(num_units: int, k: int, num_experts: int, capacity_factor: float, min_capacity: int = 1,
                     multiple_of: int = 1):
    """Capacity per expert ``C = ceil(K * S * capacity_factor / E)`` (V-MoE), at least
    ``min_capacity``, rounded up to a multiple of ``multiple_of`` (vmoe's ``multiple_of``)."""
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0 (or None for dropless), got {capacity_factor}")
    c = max(min_capacity, math.ceil(k * num_units * capacity_factor / num_experts))
    return -(-c // multiple_of) * multiple_of


def kept_assignments(route: RouterOutput, capacity_factor: float | None, *, bpr: bool = True, min_capacity: int = 1,
                     multiple_of: int = 1) -> Tensor:
    """``(S, K)`` bool: the (unit, choice) assignments :class:`SortedDispatcher` keeps in one
    routing group, computed with tensor ops only (no host sync, no shape that depends on the
    data), so that ``torch.export`` / ONNX keep the capacity as a computation on the batch.

    Each expert takes its assignments in priority order (every first choice before any
    second choice; within a choice, units by position or, with ``bpr``, by their largest
    gate) until C = :func:`compute_capacity` is reached. ``capacity_factor=None``: all of
    them (the router's ``chosen`` ones for expert choice)."""
    taken = route.chosen if route.chosen is not None else torch.ones_like(route.indices, dtype=torch.bool)
    if capacity_factor is None:
        return taken
    _check_factor("capacity_factor", capacity_factor)
    num_units, k = route.indices.shape
    num_experts = route.num_experts
    # C from the batch as a tensor, with the same float64 operations as compute_capacity
    n = torch.ones_like(route.indices[:, 0]).sum().to(torch.float64)
    cap = torch.ceil(n * k * capacity_factor / num_experts).clamp_min(min_capacity)
    cap = torch.ceil(cap / multiple_of) * multiple_of
    if bpr:  # order[r]: the unit of rank r; rank[u]: the rank of unit u
        top = route.probs.max(dim=-1).values
        # ONNX has no stable sort, but its TopK breaks ties by the lower index: the same order
        exporting = torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()
        order = top.topk(num_units).indices if exporting else top.sort(descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(num_units, device=order.device))
    onehot = F.one_hot(route.indices, num_experts) & taken[..., None]  # (S, K, E)
    before = torch.zeros_like(onehot[0, 0])  # (E,) assignments each expert took in earlier choices
    kept = []
    for c in range(k):
        sel = onehot[:, c]  # (S, E)
        if bpr:
            pos = sel[order].cumsum(0)[rank]  # 1-based position of each unit in its expert's run
        else:
            pos = sel.cumsum(0)
        slot = ((pos - 1 + before) * sel).sum(-1)  # (S,) position in the chosen expert's run
        kept.append(taken[:, c] & (slot < cap))
        before = before + sel.sum(0)
    return torch.stack(kept, dim=1)


@dataclass
class DispatchInfo:
    """Bookkeeping of one dispatch.

    Attributes:
        counts: ``(E,)`` assignments each expert was asked to take (all K choices, or those
            the router chose).
        kept_counts: ``(E,)`` assignments each expert processed (after capacity).
        kept: ``(S, K)`` bool, False for dropped assignments.
        capacity: C in units, or None when dropless.
    """

    counts: Tensor
    kept_counts: Tensor
    kept: Tensor
    capacity: int | None

    @property
    def dropped_fraction(self) -> Tensor:
        total = self.counts.sum().clamp_min(1)
        return (self.counts.sum() - self.kept_counts.sum()).float() / total


def _check_factor(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be > 0 (or None for dropless), got {value}")


class SortedDispatcher(nn.Module):
    """Sort-by-expert dispatch with optional capacity and Batch Prioritized Routing.

    Args:
        capacity_factor: capacity factor in training; None = dropless.
        eval_capacity_factor: capacity factor in eval; None = dropless.
        bpr: Batch Prioritized Routing (order units by their max gate) when capacity applies.
        min_capacity: lower bound on C.
        group_size: routing groups (vmoe's ``group_size``): capacity and BPR apply within
            each run of ``group_size`` consecutive units (the last group may be smaller, with
            its own C); None = one group, the whole batch.
        capacity_multiple_of: round C up to a multiple of this.
    """

    def __init__(
        self,
        *,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        bpr: bool = True,
        min_capacity: int = 1,
        group_size: int | None = None,
        capacity_multiple_of: int = 1,
    ) -> None:
        super().__init__()
        if group_size is not None and group_size < 1:
            raise ValueError(f"group_size must be >= 1 (or None: one group), got {group_size}")
        if capacity_multiple_of < 1:
            raise ValueError(f"capacity_multiple_of must be >= 1, got {capacity_multiple_of}")
        self.group_size, self.capacity_multiple_of = group_size, capacity_multiple_of
        _check_factor("capacity_factor", capacity_factor)
        _check_factor("eval_capacity_factor", eval_capacity_factor)
        if min_capacity < 1:
            raise ValueError(f"min_capacity must be >= 1, got {min_capacity}")
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.bpr = bpr
        self.min_capacity = min_capacity

    def capacity(self, num_units: int, k: int, num_experts: int) -> int | None:
        """C for the current mode (train/eval), or None when dropless."""
        cf = self.capacity_factor if self.training else self.eval_capacity_factor
        if cf is None:
            return None
        return compute_capacity(num_units, k, num_experts, cf, self.min_capacity, self.capacity_multiple_of)

    def forward(self, x: Tensor, route: RouterOutput, experts: Experts) -> tuple[Tensor, DispatchInfo]:
        """Run ``experts`` on ``x: (S, *P)`` as ``route`` says; returns ``(S, *P)`` and info."""
        num_units, k = route.indices.shape
        num_experts = route.num_experts
        n_assign = num_units * k
        gs = self.group_size if self.group_size and self.group_size < num_units else None
        capacity = self.capacity(gs or num_units, k, num_experts)
        device = x.device

        flat_e = route.indices.t().reshape(-1)  # (K*S,), entry j = choice * S + unit
        group = torch.arange(num_units, device=device) // gs if gs else None  # (S,) routing group of each unit
        n_groups = -(-num_units // gs) if gs else 1
        if capacity is not None and self.bpr:
            top = route.probs.max(dim=-1).values  # BPR: by the largest gate, within each group
            order = top.argsort(descending=True, stable=True)  # ties: position
            if gs is not None:  # then by group (stable): within each group, the largest gate first
                order = order[group[order].argsort(stable=True)]
            rank = torch.empty_like(order)
            rank[order] = torch.arange(num_units, device=device)
        else:
            rank = torch.arange(num_units, device=device)
        priority = (torch.arange(k, device=device)[:, None] * num_units + rank[None, :]).reshape(-1)
        run = flat_e if gs is None else flat_e * n_groups + group.repeat(k)  # (K*S,) expert-major runs
        perm = (run * n_assign + priority).sort().indices  # (K*S,) grouped by expert (and group), by priority
        if route.chosen is not None:  # the router took only some assignments (expert choice)
            taken = route.chosen.t().reshape(-1)  # (K*S,)
            perm = perm[taken[perm]]  # still grouped by expert, in priority order
            counts = expert_counts(flat_e[taken], num_experts)
        else:
            counts = expert_counts(flat_e, num_experts)  # (E,)

        if capacity is None or (gs is None and capacity >= n_assign):
            kept_perm, kept_counts = perm, counts
        elif gs is None:
            starts = counts.cumsum(0) - counts  # (E,)
            slot = torch.arange(perm.numel(), device=device) - starts[flat_e[perm]]  # (A,) A = assignments taken
            kept_perm = perm[slot < capacity]  # (N,)
            kept_counts = counts.clamp(max=capacity)
        else:  # capacity per (expert, group) run; the last group, if smaller, has its own C
            sizes = [gs] * (n_groups - 1) + [num_units - gs * (n_groups - 1)]
            caps = torch.tensor([self.capacity(n, k, num_experts) for n in sizes], device=device)
            run_counts = expert_counts(run[perm], num_experts * n_groups)
            starts = run_counts.cumsum(0) - run_counts
            slot = torch.arange(perm.numel(), device=device) - starts[run[perm]]
            kept_perm = perm[slot < caps[run[perm] % n_groups]]
            kept_counts = expert_counts(flat_e[kept_perm], num_experts)

        unit = kept_perm % num_units  # (N,)
        w = route.weights.t().reshape(-1)[kept_perm].to(x.dtype)  # (N,)
        dim = x.shape[-1]
        rows_per_unit = x[0].numel() // dim if num_units else 1  # tokens per unit (T for images)
        # experts on the gathered units (whole images move as blocks of T rows), outputs scaled
        # by w and added back where they came from (top-1: no unit twice)
        y = experts.forward_combined(x.reshape(-1, dim), unit, kept_counts * rows_per_unit, w, unique=k == 1,
                                     unit=rows_per_unit).view_as(x)  # (S, *P)

        kept = torch.zeros(n_assign, dtype=torch.bool, device=device)
        kept[kept_perm] = True
        info = DispatchInfo(counts, kept_counts, kept.view(k, num_units).t(), capacity)
        return y, info

    def extra_repr(self) -> str:
        return (
            f"capacity_factor={self.capacity_factor}, eval_capacity_factor={self.eval_capacity_factor}, "
            f"bpr={self.bpr}" + (f", group_size={self.group_size}" if self.group_size else "")
        )
