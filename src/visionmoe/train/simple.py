"""A compact supervised training loop for in-memory tensors, MoE-aware.

Adds the model's auxiliary MoE losses to the task loss, uses AdamW with linear warm-up
and cosine decay, and shows a progress bar with loss and throughput.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..moe.layer import collect_aux_loss

__all__ = ["train_classifier", "evaluate", "seed_everything"]


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch generator for data order."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - seeds the legacy global RNG that third-party code uses
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _prep(x: Tensor, size: int | None) -> Tensor:
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


def _aux(model: nn.Module) -> Tensor:
    fn = getattr(model, "moe_aux_loss", None)
    return fn() if callable(fn) else collect_aux_loss(model)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 256, img_size: int | None = None) -> float:
    """Top-1 accuracy of ``model`` on tensors ``x: (N, C, H, W)``, ``y: (N,)``."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = model(_prep(x[i : i + batch_size], img_size))
        correct += (logits.argmax(-1) == y[i : i + batch_size]).sum().item()
    return correct / max(len(x), 1)


def train_classifier(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup_steps: int = 50,
    img_size: int | None = None,
    seed: int = 0,
    augment: Callable[[Tensor], Tensor] | None = None,
    progress: bool = True,
    description: str = "train",
) -> dict:
    """Train ``model`` with cross-entropy + its MoE auxiliary losses; returns a history dict.

    Args:
        model: any classifier; MoE auxiliary losses are collected after each forward.
        x, y: training tensors ``(N, C, H, W)`` and ``(N,)``.
        img_size: resize inputs to this square size (bilinear) if given.
        augment: optional function applied to each batch (after resizing).
    """
    if len(x) == 0:
        raise ValueError("training set is empty")
    gen = seed_everything(seed)
    def _decays(name: str, p: Tensor) -> bool:  # no weight decay on norms, biases, tokens, positions
        return p.ndim >= 2 and "pos_embed" not in name and "token" not in name

    decay = [p for n, p in model.named_parameters() if _decays(n, p)]
    no_decay = [p for n, p in model.named_parameters() if not _decays(n, p)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total = epochs * steps_per_epoch
    warmup = min(warmup_steps, total // 5)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return lr * 0.5 * (1 + math.cos(math.pi * t))

    history: dict[str, list] = {"loss": [], "aux_loss": [], "step": []}
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    cols = [TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    step, seen, t0 = 0, 0, time.perf_counter()
    with Progress(*cols, disable=not progress, transient=False) as bar:
        task = bar.add_task(description, total=total, info="")
        for _ in range(epochs):
            model.train()
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), batch_size):
                idx = order[i : i + batch_size]
                xb = _prep(x[idx], img_size)
                if augment is not None:
                    xb = augment(xb)
                for g in opt.param_groups:
                    g["lr"] = lr_at(step)
                logits = model(xb)
                loss = F.cross_entropy(logits, y[idx])
                aux = _aux(model)
                opt.zero_grad(set_to_none=True)
                (loss + aux).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                step += 1
                seen += len(idx)
                history["loss"].append(loss.item())
                history["aux_loss"].append(float(aux.detach()))
                history["step"].append(step)
                ips = seen / (time.perf_counter() - t0)
                info = f"loss {loss.item():.3f}  aux {float(aux.detach()):.4f}  {ips:.0f} img/s"
                bar.update(task, advance=1, info=info)
    history["train_seconds"] = time.perf_counter() - t0
    history["images_per_second"] = seen / history["train_seconds"]
    return history
