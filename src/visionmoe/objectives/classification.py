"""Supervised classification: cross-entropy (with label smoothing, or soft targets from
timm's Mixup/CutMix) plus top-1 accuracy on the batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Objective, register_objective

__all__ = ["ClassificationObjective"]


@register_objective("classification")
class ClassificationObjective(Objective):
    """``(model, (x, y[, routing_key])) -> {"loss", "acc"}``.

    Args:
        num_classes: needed for Mixup/CutMix.
        label_smoothing: cross-entropy label smoothing.
        mixup, cutmix: alphas for timm's ``Mixup`` (0 = off); batches must have even size.
    """

    def __init__(self, num_classes: int, *, label_smoothing: float = 0.0, mixup: float = 0.0, cutmix: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.mix = None
        if mixup > 0 or cutmix > 0:
            from timm.data import Mixup

            self.mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                             num_classes=num_classes)

    @classmethod
    def from_config(cls, model, *, num_classes, total_steps, run, args):
        return cls(num_classes, label_smoothing=run.label_smoothing, mixup=run.mixup, cutmix=run.cutmix, **args)

    def forward(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        x, y = batch[0], batch[1]
        kw = {"routing_key": batch[2]} if len(batch) > 2 and batch[2] is not None else {}
        if self.mix is not None and model.training and len(x) % 2 == 0:
            x, soft = self.mix(x, y)
            logits = model(x, **kw)
            loss = torch.sum(-soft * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        else:
            logits = model(x, **kw)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        acc = (logits.argmax(-1) == y).float().mean()
        return {"loss": loss, "acc": acc.detach()}

    @torch.no_grad()
    def eval_batch(self, model: nn.Module, x: Tensor, y: Tensor, key: Tensor | None = None,
                   generator: torch.Generator | None = None) -> dict[str, float]:
        """Sums over the batch: correct predictions (``acc``) and cross-entropy (``loss``)."""
        logits = model(x) if key is None else model(x, routing_key=key)
        return {"acc": float((logits.argmax(-1) == y).sum()),
                "loss": float(F.cross_entropy(logits.float(), y, reduction="sum"))}
