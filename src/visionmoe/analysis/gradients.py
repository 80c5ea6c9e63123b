"""Which blocks' MLPs get the largest gradients: MoCE's rule for where to put experts."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from ..moe.upcycle import mlp_blocks

__all__ = ["gradient_magnitude_scores"]


def gradient_magnitude_scores(
    model: nn.Module, batches: Iterable, loss_fn: Callable[[nn.Module, object], Tensor]
) -> list[float]:
    """Mean (over batches) l2 norm of the gradient of each block's MLP parameters.

    Args:
        model: any model whose blocks hold an ``mlp`` (see :func:`visionmoe.moe.mlp_blocks`).
        batches: an iterable of batches.
        loss_fn: ``(model, batch) -> scalar loss`` (e.g. an MAE objective's ``loss``).

    Returns:
        One score per MLP block, in block order; feed them to placement
        ``"by_gradient_magnitude"`` (``resolve_placement(..., scores=...)``).
    """
    blocks = [b for _, b in mlp_blocks(model)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no blocks with an `mlp`")
    sums = [0.0] * len(blocks)
    n = 0
    was = model.training
    model.train()
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        for i, b in enumerate(blocks):
            grads = [p.grad.flatten() for p in b.mlp.parameters() if p.grad is not None]
            sums[i] += float(torch.cat(grads).norm()) if grads else 0.0
        n += 1
    model.zero_grad(set_to_none=True)
    model.train(was)
    if n == 0:
        raise ValueError("no batches given to the gradient probe")
    return [s / n for s in sums]
