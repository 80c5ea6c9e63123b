"""``MoEConfig``: everything needed to build the MoE layers of a backbone, and the factory."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .._utils import did_you_mean
from .dispatch import SortedDispatcher
from .experts import Experts
from .layer import MoE
from .routers import (
    BALANCES,
    DEFAULT_AUX_WEIGHTS,
    ROUTERS,
    SCORES,
    SELECTIONS,
    ClusterRouter,
    PooledRouter,
    Router,
    TaskRouter,
)
from .soft import SoftMoE, SoftRouter  # registers "soft": a Soft MoE layer (slots instead of routing)

__all__ = ["MoEConfig", "build_moe", "ROUTERS", "ROUTINGS"]
#: routing granularity: per token, per image by CLS token / mean token, per image by a key
ROUTINGS = ("token", "cls", "mean", "cluster", "task")


@dataclass
class MoEConfig:
    """Configuration of the MoE layers of a backbone.

    Attributes:
        num_experts: E.
        top_k: K experts per token (or per image), 1 <= K <= E.
        placement: which blocks get experts (see :mod:`visionmoe.moe.placement`).
        router: gate type: ``linear`` | ``cosine`` | ``l2``.
        routing: ``token`` | ``cls`` (image by its CLS token, ViMoE) | ``mean`` (image by
            its mean token) | ``cluster`` (MoCE, by cluster id) | ``task`` (by task id).
        num_keys: number of clusters or tasks for ``cluster`` / ``task`` routing.
        key_dim: width of the cluster/task embedding (default max(E, 16)).
        noise_std: V-MoE router noise (std used = noise_std / E, training only); default 1.0,
            V-MoE's, as the registered V-MoE variants, so the default ``load`` loss acts.
        renormalize: renormalise the top-k combine weights to sum to 1.
        capacity_factor: train capacity factor; None = dropless.
        eval_capacity_factor: eval capacity factor; None = dropless.
        bpr: Batch Prioritized Routing when capacity applies.
        expert_hidden: hidden width of each expert (default: the dense MLP's).
        shared_expert: add an always-on shared expert (ViMoE).
        shared_hidden: hidden width of the shared expert (default: the dense MLP's).
        shared_ratio: the shared expert's hidden width as a multiple of the layer's width
            (used where ``shared_hidden`` is not set: one setting for stages of different width).
        aux_weights: auxiliary loss weights by name; default V-MoE's importance + load 0.005.
        expert_parallel: P, ranks that split the experts of every layer (E/P each, tokens
            exchanged by all-to-all; :mod:`visionmoe.moe.parallel`); 1 = every rank holds all.
            Used by the :class:`~visionmoe.train.Trainer` under ``torchrun``.
        recompute_activation: recompute each expert's GELU in backward instead of keeping
            it (less activation memory, ~3% slower; :class:`~visionmoe.moe.experts.Experts`).
        selection: ``topk`` (each unit its K experts) or ``expert_choice`` (each expert its
            top ``ceil(capacity_factor * S / E)`` units, Zhou et al. 2022; ``capacity_factor``
            is then expert choice's factor, default 1, and nothing else is dropped).
        balance: ``aux`` (the auxiliary losses) or ``loss_free`` (DeepSeek-V3's selection
            bias, moved by ``balance_rate`` after every optimizer step).
        balance_rate: loss-free balancing's bias step (1e-3).
        score: ``softmax`` or ``sigmoid`` gate scores (sigmoid: normalised over the chosen K).
        slots_per_expert: Soft MoE's slots p per expert (``router: soft``).
        num_shared_experts: shared experts when ``shared_expert`` (DeepSeekMoE; they act as
            one MLP of ``num_shared_experts * shared_hidden`` units).
        expert_ratio: each expert's hidden width as a multiple of the layer's width (used
            where ``expert_hidden`` is not set; the Sweet-spot ConvNeXt's experts have ratio 2).
        group_size: routing groups (vmoe): capacity, BPR and the auxiliary losses per run of
            ``group_size`` consecutive units (tokens, or images with image-level routing)
            instead of over the whole batch; None = one group.
        capacity_multiple_of: round the capacity up to a multiple of this (vmoe).
        router_args: extra arguments of the gate class (``cosine``: ``proj_dim``,
            ``init_temperature``; ``l2``: ``proj_dim``, ``scale``; ``soft``: ``normalize``).

    Expert choice and Soft MoE need no auxiliary loss: the V-MoE default ``aux_weights`` are
    not applied to them (give other weights explicitly to apply those).
    """

    num_experts: int = 8
    top_k: int = 1
    placement: Any = "every_2"
    router: str = "linear"
    routing: str = "token"
    num_keys: int = 0
    key_dim: int | None = None
    noise_std: float = 1.0
    renormalize: bool = False
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    bpr: bool = True
    expert_hidden: int | None = None
    shared_expert: bool = False
    shared_hidden: int | None = None
    shared_ratio: float | None = None
    aux_weights: dict[str, float] = field(default_factory=lambda: {"importance": 0.005, "load": 0.005})
    expert_parallel: int = 1
    recompute_activation: bool = False
    selection: str = "topk"
    balance: str = "aux"
    balance_rate: float = 1e-3
    score: str = "softmax"
    slots_per_expert: int = 1
    num_shared_experts: int = 1
    expert_ratio: float | None = None
    group_size: int | None = None
    capacity_multiple_of: int = 1
    router_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"moe.num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"moe.top_k must be between 1 and moe.num_experts={self.num_experts}, got {self.top_k}"
            )
        if self.expert_parallel < 1 or self.num_experts % self.expert_parallel:
            raise ValueError(f"moe.expert_parallel={self.expert_parallel} must be >= 1 and divide "
                             f"moe.num_experts={self.num_experts}")
        if self.router not in ROUTERS:
            raise ValueError(_unknown("moe.router", self.router, ROUTERS))
        if self.routing not in ROUTINGS:
            raise ValueError(_unknown("moe.routing", self.routing, ROUTINGS))
        for name, value, choices in (("selection", self.selection, SELECTIONS), ("balance", self.balance, BALANCES),
                                     ("score", self.score, SCORES)):
            if value not in choices:
                raise ValueError(_unknown(f"moe.{name}", value, choices))
        if self.selection == "expert_choice" and (self.balance != "aux" or self.score != "softmax"):
            raise ValueError("moe.selection=expert_choice is balanced by construction: leave moe.balance=aux and "
                             "moe.score=softmax")
        if self.router == "soft":
            if self.routing != "token" or self.selection != "topk" or self.balance != "aux":
                raise ValueError("moe.router=soft mixes every image's tokens into slots: leave moe.routing=token, "
                                 "moe.selection=topk and moe.balance=aux")
            if self.slots_per_expert < 1:
                raise ValueError(f"moe.slots_per_expert must be >= 1, got {self.slots_per_expert}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"moe.group_size must be >= 1 (or null: one group), got {self.group_size}")
        if self.capacity_multiple_of < 1:
            raise ValueError(f"moe.capacity_multiple_of must be >= 1, got {self.capacity_multiple_of}")
        if self.expert_ratio is not None and not self.expert_ratio > 0:
            raise ValueError(f"moe.expert_ratio must be > 0 (or null: the dense MLP's width), got {self.expert_ratio}")
        if self.shared_ratio is not None and not self.shared_ratio > 0:
            raise ValueError(f"moe.shared_ratio must be > 0 (or null: the dense MLP's width), got {self.shared_ratio}")
        if self.num_shared_experts < 1:
            raise ValueError(f"moe.num_shared_experts must be >= 1, got {self.num_shared_experts}")
        if self.balance_rate < 0:
            raise ValueError(f"moe.balance_rate must be >= 0, got {self.balance_rate}")
        if not isinstance(self.router_args, Mapping):
            raise ValueError(f"moe.router_args must be a mapping of argument names to values, got "
                             f"{self.router_args!r}")
        if self.routing in ("cluster", "task") and self.num_keys < 1:
            raise ValueError(f"moe.routing={self.routing!r} needs moe.num_keys >= 1 (number of {self.routing}s)")
        for f in dataclasses.fields(self):  # a YAML "yes" or 1 would pass as true silently
            if f.type == "bool" and not isinstance(getattr(self, f.name), bool):
                raise ValueError(f"moe.{f.name} must be true or false, got {getattr(self, f.name)!r}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"moe.{name} must be > 0 (or null for dropless), got {v}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | MoEConfig | None) -> MoEConfig:
        """Build from a mapping, rejecting unknown keys with a close-match suggestion."""
        if d is None:
            return cls()
        if isinstance(d, MoEConfig):
            return d
        names = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in names:
                raise ValueError(_unknown("moe config key", key, names))
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _unknown(what: str, value: str, choices) -> str:
    return f"unknown {what} {value!r}.{did_you_mean(value, choices)} Choose from: {', '.join(map(str, choices))}"


def build_moe(
    dim: int,
    hidden: int,
    cfg: MoEConfig,
    *,
    act_layer: type[nn.Module] | nn.Module = nn.GELU,
    bias: bool = True,
    drop: float = 0.0,
    gated: bool = False,
    gate_last: bool = True,
) -> MoE:
    """Build one :class:`MoE` layer of width ``dim`` from ``cfg``; experts default to
    ``hidden`` units like the dense MLP they replace; ``gated``: GLU experts (and shared
    expert) as the dense GLU MLP they replace (SwiGLU with ``act_layer=nn.SiLU``). (Parameters are created in the order
    router, experts, shared expert, so a seed gives the same initialisation as before.)"""
    args = dict(cfg.router_args)
    ec = cfg.selection == "expert_choice"
    if ROUTERS[cfg.router] is SoftRouter:
        router: nn.Module = SoftRouter(dim, cfg.num_experts, cfg.slots_per_expert, noise_std=cfg.noise_std, **args)
    else:
        aux = {} if ec and dict(cfg.aux_weights) == DEFAULT_AUX_WEIGHTS else cfg.aux_weights
        router_kwargs = dict(noise_std=cfg.noise_std, renormalize=cfg.renormalize, aux_weights=aux,
                             selection=cfg.selection, balance=cfg.balance, balance_rate=cfg.balance_rate,
                             score=cfg.score)
        if ec:
            router_kwargs.update(capacity_factor=cfg.capacity_factor or 1.0,
                                 eval_capacity_factor=cfg.eval_capacity_factor)
        try:
            if cfg.routing in ("cluster", "task"):
                cls = ClusterRouter if cfg.routing == "cluster" else TaskRouter
                router = cls(cfg.num_keys, cfg.num_experts, cfg.top_k, embed_dim=cfg.key_dim, **router_kwargs, **args)
            else:
                router = ROUTERS[cfg.router](dim, cfg.num_experts, cfg.top_k, **router_kwargs, **args)
        except TypeError as e:  # a misspelt or foreign router_args key
            raise ValueError(f"moe.router_args {sorted(args)} do not fit the {cfg.router!r} gate ({e}); see "
                             "MoEConfig.router_args for the arguments each gate takes") from None
        if cfg.routing in ("cls", "mean"):
            router = PooledRouter(router, pool=cfg.routing)
    experts = Experts(cfg.num_experts, dim, expert_width(cfg, dim, hidden), act_layer=act_layer, bias=bias, drop=drop,
                      recompute=cfg.recompute_activation, gated=gated, gate_last=gate_last)
    shared = None
    if cfg.shared_expert:
        from timm.layers import GluMlp, Mlp

        h = cfg.num_shared_experts * shared_width(cfg, dim, hidden)
        shared = (GluMlp(dim, 2 * h, act_layer=_act_type(act_layer), bias=bias, drop=drop, gate_last=gate_last)
                  if gated else Mlp(dim, h, act_layer=_act_type(act_layer), bias=bias, drop=drop))
    if isinstance(router, SoftRouter):
        return SoftMoE(router=router, experts=experts, shared_expert=shared)
    dispatcher = SortedDispatcher(capacity_factor=None if ec else cfg.capacity_factor,
                                  eval_capacity_factor=None if ec else cfg.eval_capacity_factor, bpr=cfg.bpr,
                                  group_size=cfg.group_size, capacity_multiple_of=cfg.capacity_multiple_of)
    inner = router.base
    if cfg.group_size and isinstance(inner, Router):
        inner.group_size = cfg.group_size
    return MoE(router=router, experts=experts, dispatcher=dispatcher, shared_expert=shared)


def expert_width(cfg: MoEConfig, dim: int, hidden: int) -> int:
    """Each expert's hidden width in a layer of width ``dim`` replacing an MLP of ``hidden``
    units: ``expert_hidden``, else ``expert_ratio * dim``, else ``hidden``."""
    return cfg.expert_hidden or (round(cfg.expert_ratio * dim) if cfg.expert_ratio else hidden)


def shared_width(cfg: MoEConfig, dim: int, hidden: int) -> int:
    """One shared expert's hidden width: ``shared_hidden``, else ``shared_ratio * dim``, else ``hidden``."""
    return cfg.shared_hidden or (round(cfg.shared_ratio * dim) if cfg.shared_ratio else hidden)


def _act_type(act_layer):
    return act_layer if isinstance(act_layer, type) else type(act_layer)
