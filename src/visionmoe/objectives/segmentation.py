"""Semantic segmentation with a linear head on patch tokens (ViMoE's dense-prediction setting).

Axis legend: B images, T tokens, D width, h/w patch grid, H/W pixels, K classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Objective, register_objective

__all__ = ["SegmentationObjective", "confusion_matrix", "segmentation_scores"]

IGNORE_INDEX = 255


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``(K, K)`` counts, rows = true class, columns = predicted, ignored pixels left out."""
    keep = target != ignore_index
    idx = target[keep] * num_classes + pred[keep]
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(conf: Tensor) -> dict[str, float]:
    """mIoU (mean over classes present in the labels or the predictions), pixel accuracy and
    per-class IoU from a confusion matrix."""
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    present = union > 0
    iou = torch.where(present, inter / union.clamp_min(1), torch.full_like(inter, float("nan")))
    return {"miou": float(iou[present].mean()) if present.any() else 0.0,
            "pixel_acc": float(inter.sum() / conf.sum().clamp_min(1)),
            "iou": [round(float(v), 4) for v in iou]}


@register_objective("segmentation")
class SegmentationObjective(Objective):
    """A 1x1 (linear) head on the patch tokens, upsampled to pixels, trained with
    cross-entropy that skips ``ignore_index``.

    ``upsample="bilinear"`` (Segmenter's linear decoder): K logits per patch, interpolated
    bilinearly to the mask size. ``upsample="shuffle"``: the same 1x1 head gives K logits for
    every pixel of its patch (``K * p * p`` outputs, rearranged to pixels, as in a pixel
    shuffle), which resolves structures thinner than a patch; then interpolated to the mask
    size if that differs from the image size.

    ``eval_batch`` returns confusion-matrix counts, turned into mIoU and pixel accuracy by
    :meth:`summarize` (the trainer calls it after evaluation).

    Args:
        model: a ViT with ``forward_tokens`` (or ``forward_features``) returning ``(B, T, D)``.
        num_classes: K, background included.
    """

    def __init__(self, model: nn.Module, num_classes: int, *, ignore_index: int = IGNORE_INDEX,
                 upsample: str = "shuffle") -> None:
        super().__init__()
        if upsample not in ("bilinear", "shuffle"):
            raise ValueError(f"upsample must be 'bilinear' or 'shuffle', got {upsample!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.upsample = upsample
        self.prefix = getattr(model, "num_prefix_tokens", 1)
        self.grid = tuple(model.patch_embed.grid_size)
        self.patch = int(model.patch_embed.patch_size[0])
        outs = num_classes * (self.patch**2 if upsample == "shuffle" else 1)
        self.head = nn.Conv2d(model.embed_dim, outs, kernel_size=1)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_config(cls, model, *, num_classes, total_steps, run, args):
        return cls(model, num_classes, **args)

    def logits(self, model: nn.Module, x: Tensor, size: tuple[int, int] | None = None,
               routing_key: Tensor | None = None) -> Tensor:
        """``(B, C, H, W) -> (B, K, H, W)`` per-pixel logits (``size`` defaults to the image's)."""
        kw = {"routing_key": routing_key} if routing_key is not None else {}
        fn = getattr(model, "forward_tokens", None) or model.forward_features
        t = fn(x, **kw)[:, self.prefix :]  # (B, h*w, D)
        h, w = self.grid
        feat = t.transpose(1, 2).reshape(t.shape[0], t.shape[-1], h, w)  # (B, D, h, w)
        out = self.head(feat)  # (B, K, h, w) or (B, K*p*p, h, w)
        if self.upsample == "shuffle":
            out = F.pixel_shuffle(out, self.patch)  # (B, K, h*p, w*p)
        size = tuple(size or x.shape[-2:])
        if tuple(out.shape[-2:]) == size:
            return out
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)

    def forward(self, model: nn.Module, batch) -> dict[str, Tensor]:
        x, mask = batch[0], batch[1]
        key = batch[2] if len(batch) > 2 else None
        if mask.dim() != 3:
            raise ValueError(f"segmentation needs masks of shape (B, H, W), got {tuple(mask.shape)}; "
                             "use a pixel-labelled data set (digit_scenes, fashion_scenes)")
        logits = self.logits(model, x, mask.shape[-2:], key)
        loss = F.cross_entropy(logits.float(), mask, ignore_index=self.ignore_index)
        keep = mask != self.ignore_index
        acc = (logits.argmax(1)[keep] == mask[keep]).float().mean()
        return {"loss": loss, "pixel_acc": acc.detach()}

    @torch.no_grad()
    def eval_batch(self, model: nn.Module, x: Tensor, y: Tensor, key: Tensor | None = None,
                   generator: torch.Generator | None = None) -> dict[str, float]:
        """Sums over the batch: per-image mean cross-entropy (``loss``) and the confusion
        matrix entries ``conf_<true>_<pred>``."""
        logits = self.logits(model, x, y.shape[-2:], key)
        loss = F.cross_entropy(logits.float(), y, ignore_index=self.ignore_index, reduction="none")
        keep = (y != self.ignore_index).float()
        per_image = (loss * keep).flatten(1).sum(1) / keep.flatten(1).sum(1).clamp_min(1)
        conf = confusion_matrix(logits.argmax(1), y, self.num_classes, self.ignore_index)
        out = {"loss": float(per_image.sum())}
        out.update({f"conf_{i}_{j}": float(conf[i, j]) for i in range(self.num_classes)
                    for j in range(self.num_classes)})
        return out

    def summarize(self, metrics: dict[str, float]) -> dict[str, float | list]:
        """Replace the averaged confusion entries by ``miou``, ``pixel_acc`` and ``iou``."""
        k = self.num_classes
        prefix = "test_conf_" if any(m.startswith("test_conf_") for m in metrics) else "conf_"
        conf = torch.tensor([[metrics.get(f"{prefix}{i}_{j}", 0.0) for j in range(k)] for i in range(k)])
        rest = {m: v for m, v in metrics.items() if not m.startswith(prefix)}
        head = "test_" if prefix.startswith("test_") else ""
        return {**{f"{head}{n}": v for n, v in segmentation_scores(conf).items()}, **rest}
