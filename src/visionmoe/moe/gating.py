"""The router contract and the gating every gate type shares.

Axis legend: S routed units (tokens, or images for image-level routers), B images,
T tokens per image, D width, E experts, K top-k.

:class:`Router` turns a subclass's ``compute_logits`` into a :class:`RouterOutput`:
noisy top-k (V-MoE), expert choice, loss-free balancing, softmax or sigmoid scores, the
auxiliary losses (per routing group); :class:`RouterLike` is what the MoE layer relies on;
:func:`register_router` makes a gate type a YAML name. The gate types themselves are in
:mod:`.routers`, which re-exports all of this.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from . import losses as L

__all__ = ["RouterOutput", "Router", "RouterLike", "Level", "LEVELS", "DEFAULT_AUX_WEIGHTS", "AUX_LOSS_NAMES",
           "SELECTIONS", "BALANCES", "SCORES", "ROUTERS", "register_router"]

#: V-MoE defaults: importance and load losses, 0.005 each.
DEFAULT_AUX_WEIGHTS: dict[str, float] = {"importance": 0.005, "load": 0.005}
AUX_LOSS_NAMES = ("importance", "load", "gshard", "z", "imbalance")
#: how units and experts are matched: each unit its top-k experts, or each expert its top-C units
SELECTIONS = ("topk", "expert_choice")
#: how the load is balanced: the auxiliary losses only, or a selection bias moved each step
BALANCES = ("aux", "loss_free")
#: gate scores: softmax over the experts, or independent sigmoids (normalised over the chosen k)
SCORES = ("softmax", "sigmoid")


#: what a router routes: single tokens ``(S, D)`` or whole images ``(B, T, D)``
Level = Literal["token", "image"]
LEVELS: tuple[Level, ...] = ("token", "image")


@runtime_checkable
class RouterLike(Protocol):
    """The contract the MoE layer relies on (:class:`Router` and :class:`PooledRouter`):
    ``router(x, key) -> RouterOutput``, its ``level``, ``num_experts``, ``k``,
    ``needs_key`` and ``base``, the :class:`Router` that computes the gate (itself, or the one
    a pooled router wraps)."""

    level: Level
    needs_key: bool

    @property
    def num_experts(self) -> int: ...

    @property
    def k(self) -> int: ...

    @property
    def base(self) -> nn.Module: ...

    def __call__(self, x: Tensor, key: Tensor | None = None) -> RouterOutput: ...


#: gate types by YAML name (``moe.router``), filled by :func:`register_router`
ROUTERS: dict[str, type] = {}


def register_router(name: str):
    """Class decorator: make a gate type available as ``moe.router: name`` in configs,
    ``moeify(router=name)`` and ``build_moe``."""
    def deco(cls):
        if name in ROUTERS and ROUTERS[name] is not cls:
            raise ValueError(f"router name {name!r} is already registered by {ROUTERS[name].__name__}")
        ROUTERS[name] = cls
        return cls

    return deco


@dataclass
class RouterOutput:
    """What a router decided for a batch of S units.

    Attributes:
        indices: ``(S, K)`` long, chosen experts, best first.
        weights: ``(S, K)`` combine weights of the chosen experts (>= 0).
        probs: ``(S, E)`` gate probabilities used for dispatch (noisy in training).
        logits: ``(S, E)`` clean router logits.
        aux: unweighted auxiliary losses by name (scalars).
        aux_loss: weighted sum of the auxiliary losses (scalar).
        kept: ``(S, K)`` bool, filled by the dispatcher: False where capacity dropped it.
        chosen: ``(S, K)`` bool or None: the assignments the router took (expert choice lists
            all E experts per unit and takes only these); None = all K.
    """

    indices: Tensor
    weights: Tensor
    probs: Tensor
    logits: Tensor
    aux: dict[str, Tensor] = field(default_factory=dict)
    aux_loss: Tensor | None = None
    kept: Tensor | None = None
    chosen: Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    @property
    def k(self) -> int:
        return self.indices.shape[-1]


#: below this many experts, :func:`expert_softmax` on the CPU runs over the first axis of the
#: transposed gates (PyTorch's CPU softmax vectorises along the reduced axis, so a short last
#: axis is slow: (6400, 4) forward+backward 912 us against 193 us transposed, (4160, 8) 920 vs
#: 173, one thread; at 16 experts the plain kernel is faster)
FAST_SOFTMAX_BELOW = 16


def expert_softmax(logits: Tensor) -> Tensor:
    """``logits.softmax(-1)`` for ``(S, E)`` gate logits; on the CPU with fewer than
    :data:`FAST_SOFTMAX_BELOW` experts it is computed over the first axis of the transpose and
    returned as its transposed view (same values; the summation order, and so the last bits,
    may differ). Not under ``torch.compile`` / export, whose kernels do their own thing."""
    if (logits.dim() == 2 and logits.device.type == "cpu" and logits.shape[-1] < FAST_SOFTMAX_BELOW
            and not torch.compiler.is_compiling() and not torch.compiler.is_exporting()
            and not torch.onnx.is_in_onnx_export()):
        return logits.t().softmax(0).t()
    return logits.softmax(-1)


def top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``scores.topk(k, dim=-1)`` as ``(values, indices)``, each ``(S, k)``; for k = 1 by ``max``,
    which is several times faster on the CPU (``(6400, E)`` on one thread, E = 8 / 16: 57 / 182 us
    against 381 / 1,022 us for ``topk(1)``). Ties: ``max`` takes the first maximal expert."""
    if k == 1:
        return scores.max(dim=-1, keepdim=True)
    return scores.topk(k, dim=-1)


def _validate_k(num_experts: int, k: int) -> None:
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if not 1 <= k <= num_experts:
        raise ValueError(f"top_k (k) must be between 1 and num_experts={num_experts}, got k={k}")


def _validate_aux(aux_weights: Mapping[str, float] | None) -> dict[str, float]:
    weights = dict(DEFAULT_AUX_WEIGHTS if aux_weights is None else aux_weights)
    unknown = sorted(set(weights) - set(AUX_LOSS_NAMES))
    if unknown:
        raise ValueError(f"unknown auxiliary loss name(s) {unknown}; choose from {list(AUX_LOSS_NAMES)}")
    return weights


class Router(nn.Module):
    """Base class: subclasses implement :meth:`compute_logits`; gating is shared.

    Args:
        num_experts: E.
        k: experts per unit, 1 <= k <= E.
        noise_std: V-MoE noise; the std actually used in training is ``noise_std / E``.
        renormalize: divide the top-k weights by their sum (Mixtral style). With k = 1 the
            weight is then 1 in value but carries the gradient of ``log p`` (``p / stop_grad(p)``),
            so the router still learns from the task loss, not only from the auxiliary losses.
        aux_weights: weights of the auxiliary losses by name
            (``importance``, ``load``, ``gshard``, ``z``, ``imbalance``);
            default V-MoE's ``{"importance": 0.005, "load": 0.005}``.
        selection: ``"topk"`` or ``"expert_choice"`` (each expert its top
            ``ceil(capacity_factor * S / E)`` units; ``k`` is then E).
        capacity_factor: expert choice's C factor (mean experts per unit), default 1;
            ``eval_capacity_factor`` in eval mode when given.
        balance: ``"aux"`` or ``"loss_free"`` (a selection bias, see the module docstring).
        balance_rate: the bias step ``u`` of loss-free balancing (DeepSeek-V3: 1e-3).
        score: ``"softmax"`` or ``"sigmoid"``.
    """

    level: Level = "token"
    needs_key: bool = False

    def __init__(
        self,
        num_experts: int,
        k: int = 1,
        *,
        noise_std: float = 0.0,
        renormalize: bool = False,
        aux_weights: Mapping[str, float] | None = None,
        selection: str = "topk",
        capacity_factor: float = 1.0,
        eval_capacity_factor: float | None = None,
        balance: str = "aux",
        balance_rate: float = 1e-3,
        score: str = "softmax",
    ) -> None:
        super().__init__()
        for name, value, choices in (("selection", selection, SELECTIONS), ("balance", balance, BALANCES),
                                     ("score", score, SCORES)):
            if value not in choices:
                raise ValueError(f"router {name} must be one of {list(choices)}, got {value!r}")
        if selection == "expert_choice":
            for name, cf in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
                if cf is not None and not cf > 0:
                    raise ValueError(f"expert choice needs {name} > 0, got {cf}")
            if balance != "aux" or score != "softmax":
                raise ValueError("expert choice is balanced by construction: use balance='aux' and score='softmax' "
                                 "with it")
            k = num_experts  # every expert listed per unit; `chosen` marks the ones taken
        _validate_k(num_experts, k)
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        if balance_rate < 0:
            raise ValueError(f"balance_rate must be >= 0, got {balance_rate}")
        self.num_experts = num_experts
        self.k = k
        self.noise_std = float(noise_std)
        self.renormalize = renormalize
        self.aux_weights = _validate_aux(aux_weights)
        self.selection, self.capacity_factor = selection, float(capacity_factor)
        self.eval_capacity_factor = None if eval_capacity_factor is None else float(eval_capacity_factor)
        self.balance, self.balance_rate, self.score = balance, float(balance_rate), score
        if balance == "loss_free":
            self.register_buffer("balance_bias", torch.zeros(num_experts))  # saved in checkpoints
            self.register_buffer("load_count", torch.zeros(num_experts), persistent=False)

    @property
    def base(self) -> Router:
        """The router that computes the gate: this one."""
        return self

    def compute_logits(self, x: Tensor, key: Tensor | None = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: Tensor, key: Tensor | None = None) -> RouterOutput:
        logits = self.compute_logits(x, key)  # (S, E)
        return self.gate(logits)

    def gate(self, logits: Tensor) -> RouterOutput:
        """Noisy top-k gating on ``logits: (S, E)`` with the auxiliary losses (or expert
        choice, loss-free balancing, sigmoid scores as configured)."""
        num_experts = logits.shape[-1]
        std = self.noise_std / num_experts
        noisy = self.training and std > 0
        noisy_logits = logits + std * torch.randn_like(logits) if noisy else logits
        if self.score == "sigmoid":
            scores = noisy_logits.float().sigmoid()  # (S, E) independent gate scores
            probs = scores / scores.sum(-1, keepdim=True).clamp_min(1e-9)  # for statistics and BPR
            clean_probs = logits.float().sigmoid() if noisy else scores
            clean_probs = clean_probs / clean_probs.sum(-1, keepdim=True).clamp_min(1e-9)
        else:
            scores = probs = expert_softmax(noisy_logits.float())  # (S, E) dispatch gates
            clean_probs = expert_softmax(logits.float()) if noisy else probs
        chosen = None
        if self.selection == "expert_choice":
            indices, weights, chosen = self._expert_choice(probs)
        elif self.balance == "loss_free":
            indices = top_k(scores.detach() + self.balance_bias, self.k)[1]  # the bias only selects
            weights = scores.gather(-1, indices)
            if self.training:
                with torch.no_grad():
                    self.load_count += L.expert_counts(indices, num_experts).to(self.load_count)
        else:
            weights, indices = top_k(scores, self.k)  # (S, K)
        if self.score == "sigmoid" and self.k > 1:  # DeepSeek-V3: sigmoid scores normalised over the chosen k
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-9)
        elif (self.renormalize or self.score == "sigmoid") and self.k == 1:
            # the renormalised top-1 weight is exactly 1, which would leave the router no gradient
            # from the task loss; p / stop_grad(p) is 1 in value with the gradient of log p
            weights = weights / weights.detach().clamp_min(1e-9)
        elif self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-9)
        aux = self._grouped_aux(logits, noisy_logits if noisy else None, std, probs, clean_probs, indices)
        zero = logits.new_zeros((), dtype=torch.float32)
        aux_loss = sum((w * aux[n] for n, w in self.aux_weights.items() if w and n in aux), zero)
        return RouterOutput(
            indices=indices,
            weights=weights.to(logits.dtype),
            probs=probs,
            logits=logits,
            aux=aux,
            aux_loss=aux_loss,
            chosen=chosen,
        )

    def expert_choice_capacity(self, num_units: int) -> int:
        """C of expert choice: ``ceil(capacity_factor * S / E)`` units per expert (the eval
        factor in eval mode when set), at least 1 and at most S."""
        cf = self.eval_capacity_factor if not self.training and self.eval_capacity_factor else self.capacity_factor
        return max(1, min(num_units, math.ceil(cf * num_units / self.num_experts)))

    def _expert_choice(self, probs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Each expert's top-C units by gate probability (ties: the earlier unit first, the
        same on every device), within each routing group of :attr:`group_size` units when set:
        ``(indices, weights, chosen)``, each ``(S, E)``, every unit's experts ordered
        chosen-and-best first."""
        num_units, num_experts = probs.shape
        # a stable descending sort: equal probabilities keep the earlier unit. ONNX has no stable
        # sort, so an export uses topk (exact ties of real-valued gates are what it may order differently)
        exporting = torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()
        gs = self.group_size
        if gs and num_units > gs:  # routing groups (vmoe): each expert its top-C units of every group
            chosen = torch.cat([self._choose(probs[i : i + gs].detach(), exporting) for i in range(0, num_units, gs)])
        elif num_units:
            chosen = self._choose(probs.detach(), exporting)
        else:
            chosen = torch.zeros_like(probs, dtype=torch.bool)
        rank = torch.where(chosen, probs.detach() + 2.0, probs.detach())  # chosen experts first, best first
        order = rank.topk(num_experts, dim=-1).indices if exporting else rank.argsort(dim=-1, descending=True,
                                                                                       stable=True)
        chosen = chosen.gather(-1, order)
        return order, probs.gather(-1, order) * chosen, chosen  # weight 0 where not taken

    def _choose(self, probs: Tensor, exporting: bool) -> Tensor:
        """``(S, E)`` bools: each expert's top-C of these ``S`` units, C from ``S``."""
        chosen = torch.zeros_like(probs, dtype=torch.bool)
        c = self.expert_choice_capacity(probs.shape[0])
        p = probs.t()  # (E, S)
        top = p.topk(c, dim=-1).indices if exporting else p.argsort(dim=-1, descending=True, stable=True)[:, :c]
        chosen[top.t(), torch.arange(probs.shape[1], device=probs.device)[None, :]] = True
        return chosen

    #: routing groups (vmoe ``group_size``): the auxiliary losses are the mean over runs of
    #: ``group_size`` consecutive units (set with the dispatcher's by ``build_moe``)
    group_size: int | None = None

    def _grouped_aux(self, logits, noisy_logits, std, probs, clean_probs, indices) -> dict[str, Tensor]:
        gs = self.group_size
        if not gs or logits.shape[0] <= gs:
            return self._aux_losses(logits, noisy_logits, std, probs, clean_probs, indices)
        parts = [self._aux_losses(*(None if t is None else t[i : i + gs] for t in (logits, noisy_logits)), std,
                                  probs[i : i + gs], clean_probs[i : i + gs], indices[i : i + gs])
                 for i in range(0, logits.shape[0], gs)]
        return {k: torch.stack([p[k] for p in parts]).mean() for k in parts[0]}

    def _aux_losses(
        self,
        logits: Tensor,
        noisy_logits: Tensor | None,
        std: float,
        probs: Tensor,
        clean_probs: Tensor,
        indices: Tensor,
    ) -> dict[str, Tensor]:
        if logits.shape[0] == 0:
            return {}
        aux = {
            "importance": L.importance_loss(clean_probs),
            "gshard": L.gshard_loss(probs, indices[:, 0]),
        }
        if noisy_logits is not None:
            aux["load"] = L.load_loss(logits, noisy_logits, std, self.k)
        if self.aux_weights.get("z"):
            aux["z"] = L.z_loss(logits)
        if self.aux_weights.get("imbalance"):
            aux["imbalance"] = L.imbalance_loss(clean_probs)
        return aux

    @torch.no_grad()
    def update_balance_bias(self, group=None) -> None:
        """Loss-free balancing's step: ``bias += rate * sign(mean load - load)`` from the
        units each expert was given since the last call (summed over the ranks of ``group``
        when a process group is running, so every rank moves its copy the same way)."""
        if self.balance != "loss_free":
            return
        load = self.load_count
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load, group=group)
        if load.sum() > 0:
            self.balance_bias += self.balance_rate * torch.sign(load.mean() - load)
        load.zero_()

    def extra_repr(self) -> str:
        extra = "" if self.selection == "topk" else f", selection={self.selection!r}, " \
            f"capacity_factor={self.capacity_factor}"
        extra += "" if self.balance == "aux" else f", balance={self.balance!r}, balance_rate={self.balance_rate}"
        extra += "" if self.score == "softmax" else f", score={self.score!r}"
        return f"num_experts={self.num_experts}, k={self.k}, noise_std={self.noise_std}" + extra
