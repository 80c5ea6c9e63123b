"""The fused CPU expert kernel: one autograd node gathers the rows, runs every expert's MLP on
its contiguous chunk into preallocated buffers (serially, or over the threads in the compiled
loop, :mod:`.threads`) and scatters the weighted outputs back."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import guard_or_false

from .threads import SCRATCH, native_plan, run_serial

__all__ = ["FusedOptions", "fused_experts", "scatter_rows"]


@dataclass(frozen=True)
class FusedOptions:
    """The non-tensor arguments of :func:`fused_experts`: rows per expert, the activation,
    ``unique`` (no row twice in ``rows``), ``unit`` (T > 1: rows index whole images of T
    tokens), ``recompute`` (the GELU recomputed in backward) and ``threaded`` (a
    :data:`~.threads.THREAD_MODES` value)."""

    counts: list[int]
    act: nn.Module
    unique: bool = False
    unit: int = 1
    recompute: bool = False
    threaded: bool | str = False


def fused_experts(x: Tensor, rows: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
                  weights: Tensor | None, opts: FusedOptions) -> Tensor:
    """The experts ``(w1, b1, w2, b2)`` (stacked, timm ``Mlp`` layout) on ``x[rows]``: the sorted
    outputs ``(N, D)`` without ``weights``, else ``y: (M, D)`` with ``y[rows[n]] += weights[n] *
    ys[n]`` (see :class:`_FusedSortedMLP`)."""
    return _FusedSortedMLP.apply(x, rows, w1, b1, w2, b2, weights, opts)


def _gather_rows(src: Tensor, rows: Tensor, unit: int, name: str) -> Tensor:
    """The blocks ``rows`` of ``src`` seen as ``(M / unit, unit * D)`` (one block per image
    when ``unit`` is its token count), gathered into the scratch buffer ``name``."""
    wide = src.reshape(-1, unit * src.shape[-1])
    return torch.index_select(wide, 0, rows, out=SCRATCH.get(name, (len(rows), wide.shape[1]), src))


def _act_into(act: nn.Module, gelu: str | None, h: Tensor, name: str) -> Tensor:
    """``act(h)``, written into a scratch buffer when ``act`` is timm/torch GELU."""
    if gelu is None:
        return act(h)
    return torch._C._nn.gelu(h, approximate=gelu, out=SCRATCH.get(name, tuple(h.shape), h))


class _FusedSortedMLP(torch.autograd.Function):
    """Gather rows, run each expert's MLP on its contiguous chunk and, given combine weights
    ``w``, scale and scatter the outputs back: one autograd node for the whole expert path.

    Without ``w`` it returns the sorted outputs ``(N, D)``; with ``w: (N,)`` it returns
    ``y: (M, D)``, ``y[rows[n]] += w[n] * ys[n]`` (``unique``: every row of ``x`` appears at
    most once in ``rows``, e.g. top-1, so the scatter is a gather by the inverse
    permutation). With ``unit = T > 1`` (image-level routing) ``rows`` and ``w`` index
    whole images, blocks of T consecutive rows of ``x``: gathers and scatters move images,
    never single tokens.

    Saves the input ``x`` (which the router keeps anyway), the row index, the
    pre-activation, the activation (GELU, unless ``recompute``) and, when the combine
    weights need a gradient, the expert outputs; the gathered rows are gathered again in
    backward. Top-1 keeps about 1.1x the dense MLP's activation memory; with ``recompute``
    the activation is recomputed in backward instead (as megablocks does): about 0.7x, ~3%
    slower on the 2-core CPU. Other activations than GELU are always recomputed (their
    derivative needs autograd). ``threaded`` (a :data:`~.threads.THREAD_MODES` value): run the experts
    in parallel over the threads in the compiled loop where :func:`~.threads.native_plan` allows
    it, else one after another. Transient tensors live in per-thread scratch buffers
    (:class:`~.threads.Scratch`). Outputs and gradients equal the plain autograd path (tested).
    """

    @staticmethod
    def forward(ctx, x, rows, w1, b1, w2, b2, w, opts: FusedOptions):
        counts, act, unique, unit, recompute, threaded = (opts.counts, opts.act, opts.unique, opts.unit,
                                                          opts.recompute, opts.threaded)
        d = x.shape[1]
        n = len(rows) * unit
        xs = _gather_rows(x, rows, unit, "xs").view(n, d)  # (N*T, D)
        gelu = act.approximate if type(act) is nn.GELU else None
        w_grad = w is not None and ctx.needs_input_grad[6]
        h = xs.new_empty(n, w1.shape[1])  # (N, H) pre-activation, saved
        a = None if recompute or gelu is None else torch.empty_like(h)  # (N, H) activation, saved
        # the expert outputs are saved (gate gradient) or returned, else transient
        ys = SCRATCH.get("ys", (n, d), x) if w is not None and not w_grad else xs.new_empty(n, d)

        def expert(e: int, start: int, end: int) -> None:
            if end == start:
                return
            he = h[start:end]
            if b1 is None:
                torch.mm(xs[start:end], w1[e].t(), out=he)
            else:
                torch.addmm(b1[e], xs[start:end], w1[e].t(), out=he)
            if a is not None:
                ae = torch._C._nn.gelu(he, approximate=gelu, out=a[start:end])
            else:
                ae = _act_into(act, gelu, he, "act")
            if b2 is None:
                torch.mm(ae, w2[e].t(), out=ys[start:end])
            else:
                torch.addmm(b2[e], ae, w2[e].t(), out=ys[start:end])

        plan = native_plan(counts, threaded, gelu)
        if plan is None:
            run_serial(counts, expert)
        else:  # the same experts and groups in one at::parallel_for
            module, *where = plan
            buf = h if a is not None else SCRATCH.get("act_all", tuple(h.shape), h)  # recomputed activation
            module.experts_forward(xs, w1, b1, w2, b2, h, a, buf, ys, *where, gelu)
        ctx.plan = plan
        ctx.num_x, ctx.counts, ctx.act, ctx.has_bias = x.shape[0], counts, act, b1 is not None
        ctx.combined, ctx.unique, ctx.unit, ctx.threaded = w is not None, unique, unit, threaded
        if w is None:
            ctx.save_for_backward(rows, h, a, w1, w2, x)
            return ys
        ctx.save_for_backward(rows, h, a, w1, w2, w, ys if w_grad else None, x)
        return scatter_rows(ys.view(len(rows), unit * d), rows, ctx.num_x // unit, unique, w).view(-1, d)

    @staticmethod
    def backward(ctx, grad_out):  # grad_out: (N, D) sorted, or (M, D) with combine weights
        rows, h, a, w1, w2, *rest = ctx.saved_tensors
        grad_w, unit, d = None, ctx.unit, w1.shape[2]
        wide = (len(rows), unit * d)
        if ctx.combined:
            w, ys, *rest = rest
            g_all = _gather_rows(grad_out, rows, unit, "g")  # (N, T*D) d loss / d (w * ys)
            if ys is not None:
                grad_w = torch.linalg.vecdot(g_all, ys.view(wide))
            g_all = g_all.view(len(rows), unit, d).mul_(w[:, None, None]).view(-1, d)
        else:
            g_all = grad_out.contiguous()
        (x,) = rest
        xs = _gather_rows(x, rows, unit, "xs").view(-1, d)  # the gather again
        gw1, gw2 = torch.empty_like(w1), torch.empty_like(w2)  # every slice is written below
        gb1 = gw1.new_empty(w1.shape[:2]) if ctx.has_bias else None
        gb2 = gw2.new_empty(w2.shape[:2]) if ctx.has_bias else None
        gelu = ctx.act.approximate if type(ctx.act) is nn.GELU else None
        grad_xs = SCRATCH.get("gx", tuple(xs.shape), xs)

        def expert(e: int, start: int, end: int) -> None:
            if end == start:  # no rows: zero gradients (every expert gets one, for DDP)
                for t in (gw1, gw2) if gb1 is None else (gw1, gw2, gb1, gb2):
                    t[e].zero_()
                return
            g, he = g_all[start:end], h[start:end]
            if gelu is not None:  # saved (or recomputed) activation; its derivative in closed form
                ae = a[start:end] if a is not None else _act_into(ctx.act, gelu, he, "act")
                torch.mm(g.t(), ae, out=gw2[e])
                grad_a = torch.mm(g, w2[e], out=SCRATCH.get("grad_a", tuple(he.shape), he))
                grad_h = torch.ops.aten.gelu_backward.grad_input(
                    grad_a, he, approximate=gelu, grad_input=SCRATCH.get("grad_h", tuple(he.shape), he))
            else:  # any other activation: local autograd on the recomputed activation
                with torch.enable_grad():
                    he = he.detach().requires_grad_(True)
                    ae = ctx.act(he)
                torch.mm(g.t(), ae.detach(), out=gw2[e])
                (grad_h,) = torch.autograd.grad(ae, he, g @ w2[e])
            torch.mm(grad_h.t(), xs[start:end], out=gw1[e])
            torch.mm(grad_h, w1[e], out=grad_xs[start:end])
            if gb1 is not None:
                torch.sum(grad_h, 0, out=gb1[e])
                torch.sum(g, 0, out=gb2[e])

        if ctx.plan is None:
            run_serial(ctx.counts, expert)
        else:
            module, *where = ctx.plan
            buf = SCRATCH.get("grad_h_all", tuple(h.shape), h)
            module.experts_backward(g_all, xs, h, a, w1, w2, gw1, gb1, gw2, gb2, grad_xs, buf, *where, gelu)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = scatter_rows(grad_xs.view(wide), rows, ctx.num_x // unit, ctx.unique).view(-1, d)
        return grad_x, None, gw1, gb1, gw2, gb2, grad_w, None


def scatter_rows(src: Tensor, rows: Tensor, num_rows: int, unique: bool, weights: Tensor | None = None) -> Tensor:
    """``out[rows[n]] += weights[n] * src[n]`` (``weights`` None: 1) into a new
    ``(num_rows, D)`` tensor, zero elsewhere. With ``unique`` (no repeated row) and every
    row covered, ``rows`` is a permutation and this is a gather by its inverse (no zero
    fill; on CPU ``index_select`` is several times faster than ``index_copy_``), then an
    in-place scaling. Under ``torch.compile`` a row count that is data-dependent (capacity
    drops: an unbacked size) takes the general path rather than guarding on it."""
    if unique and guard_or_false(len(rows) == num_rows):
        inverse = torch.empty_like(rows)
        inverse[rows] = torch.arange(num_rows, device=rows.device)
        out = src.index_select(0, inverse)
        return out if weights is None else out.mul_(weights.index_select(0, inverse).unsqueeze(-1))
    if weights is not None:
        src = torch.mul(src, weights.unsqueeze(-1), out=SCRATCH.get("scaled", tuple(src.shape), src))
    return src.new_zeros(num_rows, src.shape[1]).index_add_(0, rows, src)


