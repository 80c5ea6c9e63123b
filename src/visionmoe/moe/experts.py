"""Experts: E two-layer MLPs stored as stacked weights.

Axis legend: N rows routed to experts (sorted by expert), D width, H hidden, E experts.

Each expert keeps timm ``Mlp`` layout: ``fc1_weight[e]`` is ``(H, D)`` like
``Mlp.fc1.weight`` and ``fc2_weight[e]`` is ``(D, H)`` like ``Mlp.fc2.weight``, so
upcycling a dense MLP and extracting one expert are plain copies.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import wait

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native

__all__ = ["Experts", "grouped_mm_available", "IMPLS", "THREAD_MODES", "clear_scratch"]

#: expert kernels: auto picks fused on CPU (and whenever dropout is off), grouped on CUDA
IMPLS = ("auto", "fused", "grouped", "split")


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: ``torch._grouped_mm``'s
    backward rejects stride-0 (expanded) gradients such as the one of ``y.sum()``."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def _contiguous_grad(x: Tensor) -> Tensor:
    return _ContiguousGrad.apply(x) if x.requires_grad else x


class _Scratch:
    """Per-thread buffers for the fused kernel's transient tensors (the gathered rows, the
    sorted gradients, per-expert temporaries), reused from call to call.

    A fresh multi-megabyte tensor costs a page fault per 4 KiB the first time it is written
    (the allocator hands large blocks back to the OS): on the 2-core CPU a fresh
    ``(4160, 384)`` ``index_select`` took ~2.4 ms inside a training step against ~0.3 ms
    into a reused buffer. Only tensors that live inside one forward or one backward call go
    here; saved and returned tensors are always fresh. Buffers are keyed by thread (the
    expert threads each have their own), only grow, and are freed by :func:`clear_scratch`.
    """

    def __init__(self) -> None:
        self.bufs: dict[tuple, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        n = math.prod(shape)
        key = (threading.get_ident(), name, like.device, like.dtype)
        buf = self.bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = self.bufs[key] = like.new_empty(n)
        return buf[:n].view(shape)


_SCRATCH = _Scratch()


def clear_scratch() -> None:
    """Free the reusable buffers of the fused expert kernel, of every thread (they are
    re-made, as large as needed, on the next call)."""
    _SCRATCH.bufs.clear()


#: ``Experts(threads=...)``: the compiled loop for experts of >= native.MIN_ROWS rows when
#: it is built, else the Python pool (native.set_mode); the compiled loop; the Python pool; serial
THREAD_MODES = (True, "native", "python", False)

#: below this many multiply-adds per matmul layer (N * H * D) the experts run one after
#: another: handing work to a thread costs tens of microseconds
MIN_THREADED_WORK = 2**22


class _ExpertThreads:
    """Run the experts of one layer in parallel over the intra-op threads.

    With every op split over the 2 cores, a top-1 layer of 8 experts x 520 rows ran its
    matmuls ~15% slower than one dense matmul of 4,160 rows (one thread: ~2%): small
    matmuls parallelise worse. So the experts are dealt to ``torch.get_num_threads()``
    threads (the calling one and a pool of workers), largest first onto the least loaded,
    and every op runs single-threaded (``torch.set_num_threads(1)`` in each of them for the
    duration; the caller's count is restored afterwards, also on error). Each expert writes
    only its own slices, so the result does not depend on the thread count. Torch ops
    release the GIL, so the threads run truly in parallel.
    """

    def __init__(self) -> None:
        self.pool = None
        self.key: tuple[int, int] | None = None  # (process id, workers): rebuilt after a fork
        self.lock = threading.Lock()

    def _pool(self, workers: int):
        from concurrent.futures import ThreadPoolExecutor

        key = (os.getpid(), workers)
        with self.lock:
            if self.key != key:
                if self.pool is not None and self.key[0] == key[0]:
                    self.pool.shutdown(wait=False)
                self.pool = ThreadPoolExecutor(workers, thread_name_prefix="visionmoe-experts")
                self.key = key
            return self.pool

    def run(self, counts: list[int], fn, threaded: bool) -> None:
        """``fn(e, start, end)`` for every expert ``e`` (rows ``start:end``)."""
        starts = _offsets(counts)
        nt = torch.get_num_threads()
        if not threaded or nt < 2 or sum(c > 0 for c in counts) < 2:
            for e in range(len(counts)):
                fn(e, starts[e], starts[e + 1])
            return
        groups = _deal(counts, nt)
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

        def run_group(group: list[int]) -> None:  # the caller's thread-local modes, in every thread
            torch.set_num_threads(1)  # here too, in the caller (restored below) and in each worker
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                for e in group:
                    fn(e, starts[e], starts[e + 1])

        pool = self._pool(nt - 1)
        futures = []
        try:
            futures = [pool.submit(run_group, g) for g in groups[1:] if g]
            run_group(groups[0])
        finally:
            wait(futures)  # never leave a worker writing into buffers after an error here
            torch.set_num_threads(nt)
        for f in futures:
            f.result()  # re-raise a worker's error


_THREADS = _ExpertThreads()


def _offsets(counts: list[int]) -> list[int]:
    """``[0, c0, c0 + c1, ...]``: expert e owns sorted rows ``offsets[e]:offsets[e + 1]``."""
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    return starts


def _deal(counts: list[int], threads: int) -> list[list[int]]:
    """The experts dealt to ``threads`` groups: largest first, onto the least loaded group."""
    groups: list[list[int]] = [[] for _ in range(threads)]
    load = [0] * threads
    for e in sorted(range(len(counts)), key=lambda e: -counts[e]):
        i = load.index(min(load))
        groups[i].append(e)
        load[i] += counts[e]
    return groups


def _native_plan(counts: list[int], threaded: bool | str, gelu: str | None):
    """``(module, starts, order, bounds)`` when the compiled expert loop (:mod:`.native`)
    runs these experts (``counts``: rows per expert): ``threaded`` is ``"native"``, or True
    and :func:`.native.mode` allows it (``auto``, the default: the experts with rows average
    at least :data:`.native.MIN_ROWS` rows; ``1``: always); GELU, at least 2 threads and 2
    experts with rows; and it is built. Else None (the Python thread pool or the serial
    loop). ``"native"`` without the build is an error."""
    nt = torch.get_num_threads()
    active = sum(c > 0 for c in counts)
    if threaded in (False, "python") or gelu is None or nt < 2 or active < 2:
        return None
    if threaded is True:
        mode = native.mode()
        if mode == "0" or (mode == "auto" and sum(counts) < native.MIN_ROWS * active):
            return None
    module = native.load()
    if module is None:
        if threaded == "native":
            raise RuntimeError(f"Experts(threads='native') needs the compiled expert loop: {native.status()}")
        return None
    order, bounds = [], [0]
    for g in _deal(counts, nt):
        order += g
        bounds.append(len(order))
    return module, _offsets(counts), order, bounds


def _gather_rows(src: Tensor, rows: Tensor, unit: int, name: str) -> Tensor:
    """The blocks ``rows`` of ``src`` seen as ``(M / unit, unit * D)`` (one block per image
    when ``unit`` is its token count), gathered into the scratch buffer ``name``."""
    wide = src.reshape(-1, unit * src.shape[-1])
    return torch.index_select(wide, 0, rows, out=_SCRATCH.get(name, (len(rows), wide.shape[1]), src))


def _act_into(act: nn.Module, gelu: str | None, h: Tensor, name: str) -> Tensor:
    """``act(h)``, written into a scratch buffer when ``act`` is timm/torch GELU."""
    if gelu is None:
        return act(h)
    return torch._C._nn.gelu(h, approximate=gelu, out=_SCRATCH.get(name, tuple(h.shape), h))


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
    derivative needs autograd). ``threaded`` (a :data:`THREAD_MODES` value): run the experts
    in parallel over the threads, in the compiled loop (:func:`_native_plan`) or on the
    Python pool (:class:`_ExpertThreads`). Transient tensors live in per-thread scratch buffers
    (:class:`_Scratch`). Outputs and gradients equal the plain autograd path (tested).
    """

    @staticmethod
    def forward(ctx, x, rows, counts, act, w1, b1, w2, b2, w=None, unique=False, unit=1, recompute=False,
                threaded=False):
        d = x.shape[1]
        n = len(rows) * unit
        xs = _gather_rows(x, rows, unit, "xs").view(n, d)  # (N*T, D)
        gelu = act.approximate if type(act) is nn.GELU else None
        w_grad = w is not None and ctx.needs_input_grad[8]
        h = xs.new_empty(n, w1.shape[1])  # (N, H) pre-activation, saved
        a = None if recompute or gelu is None else torch.empty_like(h)  # (N, H) activation, saved
        # the expert outputs are saved (gate gradient) or returned, else transient
        ys = _SCRATCH.get("ys", (n, d), x) if w is not None and not w_grad else xs.new_empty(n, d)

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

        plan = _native_plan(counts, threaded, gelu)
        if plan is None:
            _THREADS.run(counts, expert, threaded)
        else:  # the same experts and groups in one at::parallel_for
            module, *where = plan
            buf = h if a is not None else _SCRATCH.get("act_all", tuple(h.shape), h)  # recomputed activation
            module.experts_forward(xs, w1, b1, w2, b2, h, a, buf, ys, *where, gelu)
        ctx.plan = plan
        ctx.num_x, ctx.counts, ctx.act, ctx.has_bias = x.shape[0], counts, act, b1 is not None
        ctx.combined, ctx.unique, ctx.unit, ctx.threaded = w is not None, unique, unit, threaded
        if w is None:
            ctx.save_for_backward(rows, h, a, w1, w2, x)
            return ys
        ctx.save_for_backward(rows, h, a, w1, w2, w, ys if w_grad else None, x)
        return _scatter_rows(ys.view(len(rows), unit * d), rows, ctx.num_x // unit, unique, w).view(-1, d)

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
        grad_xs = _SCRATCH.get("gx", tuple(xs.shape), xs)

        def expert(e: int, start: int, end: int) -> None:
            if end == start:  # no rows: zero gradients (every expert gets one, for DDP)
                for t in (gw1, gw2) if gb1 is None else (gw1, gw2, gb1, gb2):
                    t[e].zero_()
                return
            g, he = g_all[start:end], h[start:end]
            if gelu is not None:  # saved (or recomputed) activation; its derivative in closed form
                ae = a[start:end] if a is not None else _act_into(ctx.act, gelu, he, "act")
                torch.mm(g.t(), ae, out=gw2[e])
                grad_a = torch.mm(g, w2[e], out=_SCRATCH.get("grad_a", tuple(he.shape), he))
                grad_h = torch.ops.aten.gelu_backward.grad_input(
                    grad_a, he, approximate=gelu, grad_input=_SCRATCH.get("grad_h", tuple(he.shape), he))
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
            _THREADS.run(ctx.counts, expert, ctx.threaded)
        else:
            module, *where = ctx.plan
            buf = _SCRATCH.get("grad_h_all", tuple(h.shape), h)
            module.experts_backward(g_all, xs, h, a, w1, w2, gw1, gb1, gw2, gb2, grad_xs, buf, *where, gelu)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _scatter_rows(grad_xs.view(wide), rows, ctx.num_x // unit, ctx.unique).view(-1, d)
        return grad_x, None, None, None, gw1, gb1, gw2, gb2, grad_w, None, None, None, None


def _scatter_rows(src: Tensor, rows: Tensor, num_rows: int, unique: bool, weights: Tensor | None = None) -> Tensor:
    """``out[rows[n]] += weights[n] * src[n]`` (``weights`` None: 1) into a new
    ``(num_rows, D)`` tensor, zero elsewhere. With ``unique`` (no repeated row) and every
    row covered, ``rows`` is a permutation and this is a gather by its inverse (no zero
    fill; on CPU ``index_select`` is several times faster than ``index_copy_``), then an
    in-place scaling."""
    if unique and len(rows) == num_rows:
        inverse = torch.empty_like(rows)
        inverse[rows] = torch.arange(num_rows, device=rows.device)
        out = src.index_select(0, inverse)
        return out if weights is None else out.mul_(weights.index_select(0, inverse).unsqueeze(-1))
    if weights is not None:
        src = torch.mul(src, weights.unsqueeze(-1), out=_SCRATCH.get("scaled", tuple(src.shape), src))
    return src.new_zeros(num_rows, src.shape[1]).index_add_(0, rows, src)


_GROUPED_OK: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_available(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> bool:
    """Whether ``torch._grouped_mm`` runs (forward and backward) here for this device and dtype."""
    key = (torch.device(device).type, dtype)
    if key not in _GROUPED_OK:
        ok = hasattr(torch, "_grouped_mm")
        if ok:
            try:
                a = torch.randn(4, 8, device=device, dtype=dtype, requires_grad=True)
                b = torch.randn(2, 8, 16, device=device, dtype=dtype, requires_grad=True)
                offs = torch.tensor([2, 4], device=device, dtype=torch.int32)
                out = torch._grouped_mm(a, b, offs=offs)
                out.backward(torch.ones_like(out))
                ref = torch.cat([a[:2] @ b[0], a[2:] @ b[1]])
                ok = bool(torch.allclose(out, ref, atol=1e-2, rtol=1e-2))
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _GROUPED_OK[key] = ok
    return _GROUPED_OK[key]


def _grouped_mm_ok(x: Tensor) -> bool:
    if torch.compiler.is_compiling():  # its meta kernel needs bf16 under compile: use split
        return False
    return grouped_mm_available(x.device, x.dtype)


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
        gated, gate_last: GLU experts (:class:`GLU`); they run in the ``split`` kernel on
            the CPU and ``grouped`` on CUDA (the fused kernel is for plain MLPs).
        threads: fused kernel on CPU: run the experts in parallel over the intra-op threads,
            each op single-threaded (faster: small matmuls parallelise badly). ``True``: in
            the compiled loop when it is built and the experts average >= 256 rows
            (:data:`visionmoe.moe.native.MIN_ROWS`; :func:`visionmoe.moe.native.set_mode` ``"1"``:
            always, ``"0"``: never), else on a Python thread pool; ``"native"``: the compiled loop
            (:mod:`visionmoe.moe.native`), an error if it is not built; ``"python"``: the
            thread pool; ``False``: one expert after another, every op using all threads.
            All give the same results.
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
        if threads not in THREAD_MODES:
            raise ValueError(f"threads must be one of {THREAD_MODES}, got {threads!r}")
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
        if gated and impl == "fused":
            raise ValueError("gated (GLU) experts run in the 'split' or 'grouped' kernel, not 'fused'")
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()
        # expert parallelism: set by :func:`visionmoe.moe.parallel.shard_experts`; then this
        # rank holds experts ``shard.start .. shard.start + shard.local - 1`` of ``num_experts``
        self.shard = None
        self.reset_parameters()

    @property
    def num_local_experts(self) -> int:
        """Experts held here: E, or E / P with expert parallelism over P ranks."""
        return self.fc1_weight.shape[0]

    def _check_whole(self, what: str) -> None:
        if self.shard is not None:
            raise RuntimeError(
                f"{what} needs every expert, but this rank holds experts {self.shard.start}.."
                f"{self.shard.start + self.shard.local - 1} of {self.num_experts} (expert parallelism); load the "
                "layout-independent checkpoint into an unsharded model (visionmoe.train.load_trained_model)")

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
            none = (None,) * self.num_local_experts
            return w1, none, w2, none
        return w1, self.fc1_bias.unbind(0), w2, self.fc2_bias.unbind(0)

    def expert(self, x: Tensor, e: int) -> Tensor:
        """Apply expert ``e`` to ``x: (..., D)``."""
        self._check_whole("Experts.expert")
        b1 = None if self.fc1_bias is None else self.fc1_bias[e]
        b2 = None if self.fc2_bias is None else self.fc2_bias[e]
        h = self.drop(self.act(F.linear(x, self.fc1_weight[e], b1)))
        return self.drop(F.linear(h, self.fc2_weight[e], b2))

    def choose_impl(self, x: Tensor) -> str:
        """The kernel ``impl="auto"`` uses for inputs like ``x``."""
        if self.impl != "auto":
            return self.impl
        if x.device.type == "cuda" and _grouped_mm_ok(x) and self._aligned(x):
            return "grouped"
        if isinstance(self.drop, nn.Identity) and not torch.compiler.is_compiling() and not self.gated:
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

        With expert parallelism (``self.shard`` set) ``counts`` still has all E entries: the
        rows are sent to the ranks holding their experts and the outputs come back in the
        same order (:func:`visionmoe.moe.parallel.expert_parallel_forward`).
        """
        if len(counts) != self.num_experts:
            raise ValueError(f"counts must have {self.num_experts} entries, got {len(counts)}")
        if self.shard is not None:
            from .parallel import expert_parallel_forward

            return expert_parallel_forward(self, x, rows, counts, impl)
        return self._gathered_local(x, rows, counts, impl)

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
        if self.shard is None and (impl or self.choose_impl(x)) == "fused":
            return self._fused(x, rows, counts, weights.to(x.dtype), unique, unit)
        if unit > 1:  # the token rows of each image, in order
            rows = (rows[:, None] * unit + torch.arange(unit, device=rows.device)).reshape(-1)
            weights = weights.repeat_interleave(unit)
        ys = self.forward_gathered(x, rows, counts, impl)
        return _scatter_rows(ys * weights.to(ys.dtype).unsqueeze(-1), rows, x.shape[0], unique)

    def _fused(self, x: Tensor, rows: Tensor, counts: Tensor | list[int], weights: Tensor | None = None,
               unique: bool = False, unit: int = 1) -> Tensor:
        if not isinstance(self.drop, nn.Identity):
            raise ValueError("the fused expert kernel does not support dropout; use impl='split'")
        counts_list = counts.tolist() if isinstance(counts, Tensor) else list(counts)
        w1, w2 = self.fc1_weight.to(x.dtype), self.fc2_weight.to(x.dtype)
        b1 = None if self.fc1_bias is None else self.fc1_bias.to(x.dtype)
        b2 = None if self.fc2_bias is None else self.fc2_bias.to(x.dtype)
        # threads only for GELU: other activations need autograd in backward, on this thread
        if self.threads not in THREAD_MODES:
            raise ValueError(f"Experts.threads must be one of {THREAD_MODES}, got {self.threads!r}")
        parallel = (x.device.type == "cpu" and type(self.act) is nn.GELU and not torch.is_autocast_enabled("cpu")
                    and len(rows) * unit * self.hidden * self.dim >= MIN_THREADED_WORK)
        threaded = self.threads if parallel else False
        return _FusedSortedMLP.apply(x, rows, counts_list, self.act, w1, b1, w2, b2, weights, unique, unit,
                                     self.recompute, threaded)

    def _gathered_local(self, x: Tensor, rows: Tensor, counts: Tensor | list[int], impl: str | None) -> Tensor:
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
            return self._gathered_local(x, torch.arange(x.shape[0], device=x.device), counts, impl="fused")
        if impl == "grouped":
            if not self._aligned(x):
                raise ValueError("impl='grouped' needs dim and hidden whose rows are multiples of 16 bytes")
            return self._forward_grouped(x, torch.as_tensor(counts, device=x.device))
        if impl != "split":
            raise ValueError(f"unknown experts impl {impl!r}; choose from {IMPLS}")
        counts = counts.tolist() if isinstance(counts, Tensor) else list(counts)
        w1, b1, w2, b2 = self._params()
        outs = []
        # Every expert runs, even on 0 rows, so all parameters get (zero) gradients:
        # DDP and optimizers see the same parameter set every step.
        for e, xe in enumerate(x.split(counts, dim=0)):
            h = self.drop(self.act(F.linear(xe, w1[e], b1[e])))  # (n_e, H)
            outs.append(self.drop(F.linear(h, w2[e], b2[e])))  # (n_e, D)
        return torch.cat(outs, dim=0)

    def _forward_grouped(self, x: Tensor, counts: Tensor) -> Tensor:
        offs = counts.cumsum(0).to(torch.int32)  # (E,) end offset of each expert's rows
        dt = x.dtype
        h = _contiguous_grad(torch._grouped_mm(x, self.fc1_weight.to(dt).transpose(-2, -1), offs=offs))  # (N, H)
        rows = None
        if self.fc1_bias is not None:
            rows = torch.repeat_interleave(torch.arange(self.num_local_experts, device=x.device), counts,
                                           output_size=x.shape[0])  # (N,) expert of each row
            h = h + self.fc1_bias.to(dt).index_select(0, rows)
        h = self.drop(self.act(h))
        y = _contiguous_grad(torch._grouped_mm(h, self.fc2_weight.to(dt).transpose(-2, -1), offs=offs))  # (N, D)
        if rows is not None:
            y = y + self.fc2_bias.to(dt).index_select(0, rows)
        return self.drop(y)

    def extra_repr(self) -> str:
        held = "" if self.shard is None else f", holds={self.shard.start}..{self.shard.start + self.shard.local - 1}"
        return f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}{held}" + (
            ", gated" if self.gated else "")
