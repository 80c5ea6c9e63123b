"""Transforms: channel/size adaptation so any source feeds any model, and training
augmentation built from torchvision's ``transforms.v2``.

Axis legend: N images, C channels, H height, W width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["adapt", "build_train_transform", "ShiftRotate", "ImageTensorDataset"]


def adapt(x: Tensor, *, channels: int | None = None, size: int | None = None) -> Tensor:
    """Make a batch ``(N, C, H, W)`` have ``channels`` (grey -> RGB by repetition, RGB ->
    grey by ITU-R 601 luma) and a square ``size`` (bilinear, antialiased when shrinking)."""
    if x.dim() != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        if x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        elif x.shape[1] == 3 and channels == 1:
            x = (x * torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            raise ValueError(f"cannot adapt {x.shape[1]} channels to {channels}")
    if size is not None and (x.shape[-2], x.shape[-1]) != (size, size):
        shrink = x.shape[-1] > size
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return x.contiguous()


class ShiftRotate(torch.nn.Module):
    """``torchvision.transforms.v2.RandomAffine(degrees, translate=(translate, translate))`` on a
    tensor image: the same parameter draws from torch's generator, in the same order, and the
    same warp (``v2.functional.affine``, nearest, zero fill), so the same images for the same
    seed; without the transform's generic parameter machinery, which at 28x28 costs twice the
    warp itself (~120 instead of ~370 us per image on one core)."""

    def __init__(self, degrees: float, translate: float) -> None:
        super().__init__()
        self.degrees, self.translate = float(degrees), float(translate)

    def forward(self, img: Tensor) -> Tensor:
        from torchvision.transforms.v2 import functional as TF

        angle = torch.empty(1).uniform_(-self.degrees, self.degrees).item()
        h, w = img.shape[-2:]
        tx = int(round(torch.empty(1).uniform_(-self.translate * w, self.translate * w).item()))
        ty = int(round(torch.empty(1).uniform_(-self.translate * h, self.translate * h).item()))
        return TF.affine(img, angle=angle, translate=[tx, ty], scale=1.0, shear=[0.0, 0.0])


def build_train_transform(kind: str, size: int):
    """Per-image training augmentation on tensors.

    ``"none"``; ``"basic"``: random crop with 1/8-size padding + horizontal flip (the
    usual small-image recipe); ``"flip"``: flip only; ``"rrc"``: random resized crop
    (scale 0.35-1) + flip; ``"shift"``: shifts of up to 1/8 of the size and rotations of up to
    10 degrees, no flip (for digits and text, whose labels a mirror changes).
    """
    from torchvision.transforms import v2

    if kind == "none":
        return None
    if kind == "basic":
        return v2.Compose([v2.RandomCrop(size, padding=max(1, size // 8), padding_mode="reflect"),
                           v2.RandomHorizontalFlip()])
    if kind == "flip":
        return v2.RandomHorizontalFlip()
    if kind == "shift":
        return ShiftRotate(degrees=10.0, translate=0.125)
    if kind == "rrc":
        return v2.Compose([v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True), v2.RandomHorizontalFlip()])
    raise ValueError(f"unknown augmentation {kind!r}; choose from 'none', 'basic', 'flip', 'shift', 'rrc'")


class ImageTensorDataset(torch.utils.data.Dataset):
    """``(image, label)`` pairs from in-memory tensors, with an optional per-image transform."""

    def __init__(self, x: Tensor, y: Tensor, transform=None) -> None:
        if len(x) != len(y):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        img = self.x[i]
        if self.transform is not None:
            img = self.transform(img)
        return img, self.y[i]
