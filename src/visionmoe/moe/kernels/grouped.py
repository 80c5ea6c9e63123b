"""The grouped kernel (``torch._grouped_mm``: all experts in two grouped matmuls, CUDA) and
the split kernel (one plain matmul per expert under autograd: any activation, dropout,
``torch.compile``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["grouped_mm_available", "grouped_mm_ok", "grouped_forward", "split_forward"]


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


def grouped_mm_ok(x: Tensor) -> bool:
    if torch.compiler.is_compiling():  # its meta kernel needs bf16 under compile: use split
        return False
    return grouped_mm_available(x.device, x.dtype)




def grouped_forward(x: Tensor, counts: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
                    act: nn.Module, drop: nn.Module) -> Tensor:
    """Expert e on the e-th contiguous chunk of ``x: (N, D)`` (``counts``: ``(E,)`` rows per
    expert) with two ``torch._grouped_mm`` calls; biases added per row."""
    offs = counts.cumsum(0).to(torch.int32)  # (E,) end offset of each expert's rows
    dt = x.dtype
    h = _contiguous_grad(torch._grouped_mm(x, w1.to(dt).transpose(-2, -1), offs=offs))  # (N, H)
    rows = None
    if b1 is not None:
        rows = torch.repeat_interleave(torch.arange(w1.shape[0], device=x.device), counts,
                                       output_size=x.shape[0])  # (N,) expert of each row
        h = h + b1.to(dt).index_select(0, rows)
    h = drop(act(h))
    y = _contiguous_grad(torch._grouped_mm(h, w2.to(dt).transpose(-2, -1), offs=offs))  # (N, D)
    if rows is not None:
        y = y + b2.to(dt).index_select(0, rows)
    return drop(y)


def split_forward(x: Tensor, counts: list[int], params: tuple[tuple[Tensor | None, ...], ...], act: nn.Module,
                  drop: nn.Module) -> Tensor:
    """Expert e on the e-th contiguous chunk of ``x: (N, D)`` with plain autograd, one matmul
    per expert; ``params`` = ``(w1s, b1s, w2s, b2s)``, one entry per expert. Every expert
    runs, even on 0 rows, so all parameters get (zero) gradients: DDP and optimizers see the
    same parameter set every step."""
    w1, b1, w2, b2 = params
    outs = []
    for e, xe in enumerate(x.split(counts, dim=0)):
        h = drop(act(F.linear(xe, w1[e], b1[e])))  # (n_e, H)
        outs.append(drop(F.linear(h, w2[e], b2[e])))  # (n_e, D)
    return torch.cat(outs, dim=0)
