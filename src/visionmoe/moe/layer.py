"""The MoE layer: a drop-in MLP with the contract ``(..., D) -> (..., D)``.

Axis legend: B images, T tokens per image, D width, S routed units, E experts, K top-k.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .dispatch import SortedDispatcher, kept_assignments
from .experts import Experts
from .routers import LEVELS, RouterLike, RouterOutput

__all__ = ["MoE", "MoEResult", "routing_key", "moe_layers", "collect_aux_loss", "collect_routing_stats"]


@dataclass
class MoEResult:
    """What one MoE layer did in its last forward (all tensors detached but ``aux_loss``).

    Attributes:
        aux_loss: weighted auxiliary loss (scalar, differentiable).
        aux: unweighted auxiliary losses by name (detached).
        expert_counts: ``(E,)`` units routed to each expert, all K choices, before capacity.
        kept_counts: ``(E,)`` units each expert processed.
        dropped_fraction: share of (unit, choice) assignments dropped by capacity.
        gate_entropy: mean entropy (nats) of the gate distribution per unit.
        indices: ``(S, K)`` chosen experts; ``weights``: ``(S, K)`` combine weights.
        kept: ``(S, K)`` bool; ``probs``: ``(S, E)`` gate probabilities.
        level: ``"token"`` or ``"image"`` (then S = B and each unit holds ``tokens_per_unit``).
    """

    aux_loss: Tensor
    aux: dict[str, Tensor]
    expert_counts: Tensor
    kept_counts: Tensor
    dropped_fraction: Tensor
    gate_entropy: Tensor
    indices: Tensor
    weights: Tensor
    kept: Tensor
    probs: Tensor
    level: str = "token"
    tokens_per_unit: int = 1
    capacity: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_expert(self) -> Tensor:
        """``(E,)`` tokens each expert processed."""
        return self.kept_counts * self.tokens_per_unit

    def stats(self) -> dict[str, float | list[float]]:
        """Plain-Python summary for logging."""
        load = self.expert_counts.float() / self.expert_counts.sum().clamp_min(1)
        out: dict[str, float | list[float]] = {
            "aux_loss": float(self.aux_loss.detach()),
            "dropped_fraction": float(self.dropped_fraction),
            "gate_entropy": float(self.gate_entropy),
            "max_load": float(load.max()) if load.numel() else 0.0,
            "load": [round(v, 4) for v in load.tolist()],
        }
        if "experts_per_unit" in self.extra:  # expert choice: share of units with 0, 1, ..., E experts
            h = self.extra["experts_per_unit"].float()
            out["experts_per_unit"] = [round(v, 4) for v in (h / h.sum().clamp_min(1)).tolist()]
        out.update({f"aux_{k}": float(v) for k, v in self.aux.items()})
        return out


class MoE(nn.Module):
    """Mixture-of-Experts MLP.

    ``y = shared_expert(x) + sum_k w_k * expert_{i_k}(x)`` over the K experts the router
    picks (dropped assignments contribute zero). Token-level routers route each of the
    ``prod(x.shape[:-1])`` vectors on its own; image-level routers see ``x`` as
    ``(B, T, D)`` and route whole images (every token of an image to the same experts).

    Args:
        router: a token- or image-level router (:class:`~visionmoe.moe.routers.RouterLike`:
            a :class:`~visionmoe.moe.routers.Router` or a pooled one).
        experts: :class:`~visionmoe.moe.experts.Experts` with the same E.
        dispatcher: default :class:`~visionmoe.moe.dispatch.SortedDispatcher` (dropless).
        shared_expert: optional always-on module ``(..., D) -> (..., D)`` (ViMoE).
    """

    def __init__(
        self,
        *,
        router: RouterLike,
        experts: Experts,
        dispatcher: nn.Module | None = None,
        shared_expert: nn.Module | None = None,
    ) -> None:
        super().__init__()
        missing = [a for a in ("level", "num_experts", "k", "base", "needs_key") if not hasattr(router, a)]
        if missing or getattr(router, "level", None) not in LEVELS:
            raise TypeError(f"router {type(router).__name__} does not follow the router contract (lacks {missing}, "
                            f"or level not in {LEVELS}): subclass visionmoe.moe.Router (compute_logits) or wrap one "
                            "in PooledRouter")
        if router.num_experts != experts.num_experts:
            raise ValueError(
                f"router has num_experts={router.num_experts} but experts has {experts.num_experts}"
            )
        router_dim = getattr(router.base, "dim", None)
        if router_dim is not None and router_dim != experts.dim:
            raise ValueError(f"router width {router_dim} does not match experts width dim={experts.dim}")
        self.router = router
        self.experts = experts
        self.dispatcher = dispatcher if dispatcher is not None else SortedDispatcher()
        self.shared_expert = shared_expert
        self.dim = experts.dim
        self.route_key: Tensor | None = None  # set by the `routing_key` context manager
        self.last: MoEResult | None = None
        # True: ``last.extra["probs"]`` keeps the differentiable (S, E) gate probabilities
        # (for losses on the gates, e.g. CR-MoE's OGAR)
        self.keep_probs = False
        # "sparse" / "dense" (or True): the export paths (see :meth:`_forward_static`); set by
        # :func:`visionmoe.export.static_moe`
        self.static: bool | str = False

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def k(self) -> int:
        return self.router.k

    @property
    def level(self) -> str:
        return self.router.level

    def forward(self, x: Tensor, key: Tensor | None = None) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"MoE expects inputs of width D={self.dim}, got shape {tuple(x.shape)}")
        key = key if key is not None else self.route_key
        shape = x.shape
        if self.router.level == "image":
            if x.dim() < 2:
                raise ValueError(f"image-level routing needs a batch dimension, got shape {tuple(shape)}")
            units = x.reshape(shape[0], -1, self.dim)  # (B, T, D)
        else:
            units = x.reshape(-1, self.dim)  # (S, D)
        route: RouterOutput = self.router(units, key)
        if self.static:
            return self._forward_static(x, units, route)
        y, info = self.dispatcher(units, route, self.experts)
        y = y.reshape(shape)
        if self.shared_expert is not None:
            y = y + self.shared_expert(x)
        route.kept = info.kept
        self.last = self._record(route, info, units)
        if self.keep_probs:
            self.last.extra["probs"] = route.probs
        if route.chosen is not None:  # expert choice: how many experts each unit got (0..E)
            self.last.extra["experts_per_unit"] = torch.bincount(info.kept.sum(-1), minlength=self.num_experts + 1)
        return y

    def _forward_static(self, x: Tensor, units: Tensor, route: RouterOutput) -> Tensor:
        """The export path (ONNX / torch.export), chosen by ``self.static``; nothing is
        recorded in ``last``.

        ``"sparse"``: each expert runs only on the units routed to it and kept by the
        dispatcher's capacity of the current mode (:func:`~visionmoe.moe.dispatch.kept_assignments`),
        gathered by index (``nonzero`` / ``index_select`` / ``index_add``: dynamic shapes,
        the expert FLOPs of dispatch). ``"dense"`` (or True): every expert runs on every unit
        and a ``(S, E)`` combine matrix (zero off the top-k) mixes the results: static shapes,
        dropless, E/K times the expert FLOPs."""
        if self.static == "sparse":
            y = self._sparse_experts(units, route)
        else:
            combine = torch.zeros_like(route.probs, dtype=units.dtype).scatter(
                1, route.indices, route.weights.to(units.dtype))  # (S, E)
            combine = combine.reshape(combine.shape + (1,) * (units.dim() - 1))  # (S, E, 1[, 1])
            y = sum(combine[:, e] * self.experts.expert(units, e) for e in range(self.num_experts))
        y = y.reshape(x.shape)
        if self.shared_expert is not None:
            y = y + self.shared_expert(x)
        return y

    def _sparse_experts(self, units: Tensor, route: RouterOutput) -> Tensor:
        d = self.dispatcher
        if not isinstance(d, SortedDispatcher):
            raise ValueError(f"sparse export needs the SortedDispatcher, not {type(d).__name__}; "
                             "export with the dense experts path (static='dense')")
        cf = d.capacity_factor if self.training else d.eval_capacity_factor
        if cf is not None and d.group_size is not None:
            raise ValueError("sparse export of a capacity within routing groups (moe.group_size) is not supported; "
                             "export dropless (eval_capacity_factor None) or with the dense experts path")
        kept = kept_assignments(route, cf, bpr=d.bpr, min_capacity=d.min_capacity,
                                multiple_of=d.capacity_multiple_of)  # (S, K)
        y = torch.zeros_like(units)
        ones = (1,) * (units.dim() - 1)
        weights = route.weights.to(units.dtype)
        everything = cf is None and route.chosen is None  # then kept is all True: skip the mask
        if route.k == 1:  # each unit in at most one expert: gather, run, put back; scale once at the end
            choice = route.indices[:, 0] if everything else route.indices[:, 0].masked_fill(~kept[:, 0], -1)
            for e in range(self.num_experts):
                rows = (choice == e).nonzero().squeeze(1)  # the units expert e takes
                y = y.index_add(0, rows, self.experts.expert(units.index_select(0, rows), e))
            return y * weights[:, 0].reshape((-1, *ones))
        for e in range(self.num_experts):  # a unit lists an expert at most once among its K choices
            mine = route.indices == e if everything else (route.indices == e) & kept  # (S, K)
            rows = mine.any(-1).nonzero().squeeze(1)
            w = (weights * mine).sum(-1).index_select(0, rows).reshape((-1, *ones))
            y = y.index_add(0, rows, w * self.experts.expert(units.index_select(0, rows), e))
        return y

    def _record(self, route: RouterOutput, info, units: Tensor) -> MoEResult:
        probs = route.probs.detach()
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean() if probs.numel() else probs.sum()
        aux_loss = route.aux_loss if route.aux_loss is not None else units.new_zeros(())
        return MoEResult(
            aux_loss=aux_loss,
            aux={k: v.detach() for k, v in route.aux.items()},
            expert_counts=info.counts.detach(),
            kept_counts=info.kept_counts.detach(),
            dropped_fraction=info.dropped_fraction.detach(),
            gate_entropy=entropy,
            indices=route.indices.detach(),
            weights=route.weights.detach(),
            kept=info.kept,
            probs=probs,
            level=self.router.level,
            tokens_per_unit=units.shape[1] if self.router.level == "image" else 1,
            capacity=info.capacity,
        )

    def extra_repr(self) -> str:
        return f"level={self.router.level!r}"


def moe_layers(model: nn.Module) -> Iterator[tuple[str, MoE]]:
    """``(name, layer)`` for every MoE layer of ``model``, in module order."""
    for name, m in model.named_modules():
        if isinstance(m, MoE):
            yield name, m


def collect_aux_loss(model: nn.Module) -> Tensor:
    """Sum of the weighted auxiliary losses of the last forward over all MoE layers."""
    losses = [m.last.aux_loss for _, m in moe_layers(model) if m.last is not None]
    if not losses:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return torch.stack([loss.float() for loss in losses]).sum()


def collect_routing_stats(model: nn.Module) -> dict[str, dict]:
    """``{layer name: stats}`` of the last forward of every MoE layer."""
    return {name: m.last.stats() for name, m in moe_layers(model) if m.last is not None}


@contextmanager
def routing_key(model: nn.Module, key: Tensor | None):
    """Give every MoE layer of ``model`` a routing key (cluster or task ids, ``(B,)``) for
    the forward passes inside the ``with`` block; works on any model, timm's included."""
    layers = [m for _, m in moe_layers(model)]
    old = [m.route_key for m in layers]
    for m in layers:
        m.route_key = key
    try:
        yield
    finally:
        for m, k in zip(layers, old):
            m.route_key = k


#: what torch.compile needs to trace a MoE layer in one graph: the per-expert row counts become
#: unbacked sizes (``.tolist()``) and the kept-assignment mask a data-dependent shape, instead of
#: graph breaks
COMPILE_SETTINGS = {"capture_scalar_outputs": True, "capture_dynamic_output_shape_ops": True}


def compile_settings():
    """A context manager under which ``torch.compile`` traces MoE layers without graph breaks
    (:data:`COMPILE_SETTINGS`, patched into ``torch._dynamo.config`` only while it is open).
    Compilation is lazy, so call the compiled model inside it::

        compiled = torch.compile(model, fullgraph=True)
        with compile_settings():
            loss = compiled(x).sum()

    The Trainer does this itself with ``run.compile: true``."""
    import torch._dynamo

    return torch._dynamo.config.patch(**COMPILE_SETTINGS)
