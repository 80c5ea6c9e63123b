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

from .kernels import (
    MIN_THREADED_WORK,
    THREAD_MODES,
    FusedOptions,
    check_mode,
    clear_scratch,
    fused_experts,
    grouped_forward,
    grouped_mm_available,
    grouped_mm_ok,
    scatter_rows,
    split_forward,
)

__all__ = ["Experts", "grouped_mm_available", "IMPLS", "THREAD_MODES", "clear_scratch"]

#: expert kernels (:mod:`.kernels`): auto picks fused on CPU (and whenever dropout is off),
#: grouped on CUDA
IMPLS = ("auto", "fused", "grouped", "split")


class GLU(nn.Module):
    """Gated activation of GLU-family MLPs (timm's ``GluMlp`` / ``SwiGLUPacked`` / ``SwiGLU``):
    ``(..., 2H) -> (..., H)``, ``x1 * act(x2)`` (``gate_last``) or ``act(x1) * x2``, where
    ``x1, x2`` are the two halves of the fc1 output."""

    def __init__(self, act: nn.Module, gate_last: bool = True) -> None:
        super().__init__()
        self.act, self.gate_last = act, gate_last

    def forward(self, h: Tensor) -> Tensor:
        a, b = h.chunk(2, dim=-1)
        return a * self.act(b) if self.gate_last else self.act(a) * b

    def extra_repr(self) -> str:
        return f"gate_last={self.gate_last}"


class Experts(nn.Module):
    """E MLPs ``fc2(act(fc1(x)))`` with stacked parameters; with ``gated=True`` GLU experts
    ``fc2(GLU(fc1(x)))`` whose fc1 has ``2 * hidden`` outputs (SwiGLU: ``act_layer=nn.SiLU``).

    Args:
        num_experts: E.
        dim: D, input and output width.
        hidden: H, hidden width of each expert.
        act_layer: activation module class (default ``nn.GELU``, as timm's ViT).
        bias: use biases (timm's ``Mlp`` does).
        drop: dropout after the activation and after fc2 (timm ``Mlp`` semantics).
        impl: ``"auto"`` | ``"fused"`` | ``"grouped"`` | ``"split"``, see :meth:`forward_gathered`.
        recompute: fused kernel: recompute the GELU activation in backward instead of saving
            it (top-1: ~0.7x instead of ~1.1x the dense MLP's activation memory, ~3% slower).
        gated, gate_last: GLU experts (:class:`GLU`); every kernel runs them (the fused one
            serially, its GLU derivative by autograd in backward).
        threads: fused kernel on CPU: run the experts in parallel over the intra-op threads,
            each op single-threaded, in the compiled loop (:mod:`visionmoe.moe.native`).
            ``True``: there when it is built and the experts average >= 256 rows
            (:data:`visionmoe.moe.native.MIN_ROWS`; :func:`visionmoe.moe.native.set_mode` ``"1"``:
            always, ``"0"``: never), else one after another; ``"native"``: the compiled loop,
            an error if it is not built; ``False``: one expert after another, every op using
            all threads. All give the same results. (``"python"``, a Python thread pool, was
            removed: it never beat the serial loop, and lost by 1.1-1.5x at the recipes' D = 64 layer.)
            Attribute, can be changed.
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
        impl: str = "auto",
        recompute: bool = False,
        threads: bool | str = True,
        gated: bool = False,
        gate_last: bool = True,
    ) -> None:
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"unknown experts impl {impl!r}; choose from {IMPLS}")
        check_mode(threads)
        self.impl, self.recompute, self.threads = impl, recompute, threads
        if num_experts < 1 or dim < 1 or hidden < 1:
            raise ValueError(f"num_experts, dim and hidden must be >= 1, got {num_experts}, {dim}, {hidden}")
        self.num_experts, self.dim, self.hidden, self.gated = num_experts, dim, hidden, gated
        fc1_out = 2 * hidden if gated else hidden
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, fc1_out, dim))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.fc1_bias = nn.Parameter(torch.zeros(num_experts, fc1_out)) if bias else None
        self.fc2_bias = nn.Parameter(torch.zeros(num_experts, dim)) if bias else None
        act = act_layer() if isinstance(act_layer, type) else act_layer
        self.act = GLU(act, gate_last) if gated else act
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.reset_parameters()

    #: whether :meth:`forward_combined` may run gather, experts and combine as one fused node
    #: (not across ranks: :class:`~visionmoe.moe.parallel.ExpertParallel`)
    fuses_combine = True
    #: which experts this module holds when split over ranks (:class:`~visionmoe.moe.parallel.ExpertParallel`);
    #: None: all of them
    shard = None

    @property
    def num_local_experts(self) -> int:
        """Experts held here: E, or E / P with expert parallelism over P ranks."""
        return self.fc1_weight.shape[0]

    def reset_parameters(self) -> None:
        """timm ViT init: truncated normal std 0.02 for weights, zero biases."""
        nn.init.trunc_normal_(self.fc1_weight, std=0.02)
        nn.init.trunc_normal_(self.fc2_weight, std=0.02)
        if self.fc1_bias is not None:
            nn.init.zeros_(self.fc1_bias)
            nn.init.zeros_(self.fc2_bias)

    def _params(self) -> tuple[tuple[Tensor, ...], ...]:
        # unbind once per forward: indexing w[e] per expert makes backward allocate E
        # zero-filled full-size gradient buffers.
        w1, w2 = self.fc1_weight.unbind(0), self.fc2_weight.unbind(0)
        if self.fc1_bias is None:
            none = (None,) * self.num_local_experts
            return w1, none, w2, none
        return w1, self.fc1_bias.unbind(0), w2, self.fc2_bias.unbind(0)

    def expert(self, x: Tensor, e: int) -> Tensor:
        """Apply expert ``e`` to ``x: (..., D)``."""
        b1 = None if self.fc1_bias is None else self.fc1_bias[e]
        b2 = None if self.fc2_bias is None else self.fc2_bias[e]
        h = self.drop(self.act(F.linear(x, self.fc1_weight[e], b1)))
        return self.drop(F.linear(h, self.fc2_weight[e], b2))

    def choose_impl(self, x: Tensor) -> str:
        """The kernel ``impl="auto"`` uses for inputs like ``x``."""
        if self.impl != "auto":
            return self.impl
        if x.device.type == "cuda" and grouped_mm_ok(x) and self._aligned(x):
            return "grouped"
        if isinstance(self.drop, nn.Identity) and not torch.compiler.is_compiling():
            return "fused"
        return "split"

    def _aligned(self, x: Tensor) -> bool:  # grouped_mm needs 16-byte aligned row strides
        return all(d * x.element_size() % 16 == 0 for d in (self.dim, self.hidden))

    def forward_gathered(self, x: Tensor, rows: Tensor, counts: Tensor | list[int], impl: str | None = None) -> Tensor:
        """Gather ``x[rows]`` and apply expert e to the e-th contiguous chunk of them.

        Args:
            x: ``(M, D)`` input rows in their original order.
            rows: ``(N,)`` which row of ``x`` each sorted slot takes (sorted by expert).
            counts: ``(E,)`` rows per expert (tensor or list), summing to N.
            impl: ``"fused"`` (a custom autograd function writing every expert's matmuls into
                preallocated buffers, saving only ``x``, ``rows`` and the pre-activation and
                recomputing the rest in backward; no dropout),
                ``"grouped"`` (``torch._grouped_mm``), ``"split"`` (plain autograd, one matmul
                per expert), or None for this module's ``impl``.

        Returns:
            ``(N, D)`` expert outputs in sorted order.

        :class:`~visionmoe.moe.parallel.ExpertParallel` overrides it: the rows travel to the
        ranks holding their experts and back.
        """
        if len(counts) != self.num_experts:
            raise ValueError(f"counts must have {self.num_experts} entries, got {len(counts)}")
        return self.forward_local(x, rows, counts, impl)

    def forward_combined(self, x: Tensor, rows: Tensor, counts: Tensor | list[int], weights: Tensor, *,
                         unique: bool = False, unit: int = 1, impl: str | None = None) -> Tensor:
        """:meth:`forward_gathered`, then the combine: returns ``y: (M, D)`` with
        ``y[rows[n]] += weights[n] * ys[n]`` and zeros for rows of ``x`` no expert took.
        ``unique``: no row appears twice in ``rows`` (top-1). ``unit = T > 1``: ``rows`` and
        ``weights`` index whole images, blocks of T consecutive rows of ``x`` (``counts`` still
        counts rows). The fused kernel does all of it in one autograd node, moving whole
        images and never single tokens; other kernels, and expert parallelism, run
        :meth:`forward_gathered` on the token rows and scatter."""
        if len(counts) != self.num_experts:
            raise ValueError(f"counts must have {self.num_experts} entries, got {len(counts)}")
        if self.fuses_combine and (impl or self.choose_impl(x)) == "fused":
            return self._fused(x, rows, counts, weights.to(x.dtype), unique, unit)
        if unit > 1:  # the token rows of each image, in order
            rows = (rows[:, None] * unit + torch.arange(unit, device=rows.device)).reshape(-1)
            weights = weights.repeat_interleave(unit)
        ys = self.forward_gathered(x, rows, counts, impl)
        return scatter_rows(ys * weights.to(ys.dtype).unsqueeze(-1), rows, x.shape[0], unique)

    def _fused(self, x: Tensor, rows: Tensor, counts: Tensor | list[int], weights: Tensor | None = None,
               unique: bool = False, unit: int = 1) -> Tensor:
        if not isinstance(self.drop, nn.Identity):
            raise ValueError("the fused expert kernel does not support dropout; use impl='split'")
        counts_list = counts.tolist() if isinstance(counts, Tensor) else list(counts)
        w1, w2 = self.fc1_weight.to(x.dtype), self.fc2_weight.to(x.dtype)
        b1 = None if self.fc1_bias is None else self.fc1_bias.to(x.dtype)
        b2 = None if self.fc2_bias is None else self.fc2_bias.to(x.dtype)
        # threads only for GELU: other activations need autograd in backward, on this thread
        check_mode(self.threads)
        parallel = (x.device.type == "cpu" and type(self.act) is nn.GELU and not torch.is_autocast_enabled("cpu")
                    and len(rows) * unit * self.hidden * self.dim >= MIN_THREADED_WORK)
        threaded = self.threads if parallel else False
        opts = FusedOptions(counts_list, self.act, unique, unit, self.recompute, threaded)
        return fused_experts(x, rows, w1, b1, w2, b2, weights, opts)

    def forward_local(self, x: Tensor, rows: Tensor, counts: Tensor | list[int], impl: str | None = None) -> Tensor:
        """:meth:`forward_gathered` on the experts held here (``counts`` has one entry each)."""
        impl = impl or self.choose_impl(x)
        if impl == "fused":
            return self._fused(x, rows, counts)
        return self(x.index_select(0, rows), counts, impl=impl)

    def forward(self, x: Tensor, counts: Tensor | list[int], impl: str | None = None) -> Tensor:
        """Apply expert e to the e-th contiguous chunk of rows of ``x: (N, D)`` (sorted by
        expert; ``counts``: ``(E,)`` rows per expert). ``impl``: ``"grouped"`` or ``"split"``
        (``"auto"``/``"fused"`` pick as in :meth:`forward_gathered`). Runs the experts held
        here: with expert parallelism ``counts`` has one entry per local expert."""
        if len(counts) != self.num_local_experts:
            raise ValueError(f"counts must have {self.num_local_experts} entries, got {len(counts)}")
        impl = impl or self.choose_impl(x)
        if impl == "fused":
            return self.forward_local(x, torch.arange(x.shape[0], device=x.device), counts, impl="fused")
        if impl == "grouped":
            if not self._aligned(x):
                raise ValueError("impl='grouped' needs dim and hidden whose rows are multiples of 16 bytes")
            return self._forward_grouped(x, torch.as_tensor(counts, device=x.device))
        if impl != "split":
            raise ValueError(f"unknown experts impl {impl!r}; choose from {IMPLS}")
        counts = counts.tolist() if isinstance(counts, Tensor) else list(counts)
        return split_forward(x, counts, self._params(), self.act, self.drop)

    def _forward_grouped(self, x: Tensor, counts: Tensor) -> Tensor:
        return grouped_forward(x, counts, self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias, self.act,
                               self.drop)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}" + (
            ", gated" if self.gated else "")
