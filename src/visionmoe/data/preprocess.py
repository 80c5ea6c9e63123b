"""One preprocessing from training to prediction.

A :class:`Preprocessing` says how an image becomes a model input: its channels, its size, how
it is resized (``squash``: the whole image to ``size x size``; ``crop``: the shorter side to
``size / crop_pct``, then a centred ``size x size`` crop, timm's eval transform) and the
per-channel mean / std it is normalised with. The training run stores it in every checkpoint;
``eval``, ``predict``, ``export``, ``probe`` and ``analyze`` apply exactly that one, so a
model is never scored on pixels prepared differently from those it is deployed on.

Axis legend: N images, C channels, H height, W width.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

__all__ = ["Preprocessing", "open_image", "NORMALIZATIONS", "resolve_normalization"]

#: named per-channel (mean, std) pairs for RGB; greyscale takes the luma-weighted mean of each
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "none": None,
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def resolve_normalization(name: str, channels: int, model: Any = None) -> tuple[tuple, tuple] | tuple[None, None]:
    """``(mean, std)`` per channel for a ``data.normalize`` name: ``none``, ``imagenet``,
    ``inception`` or ``model`` (the model's timm ``pretrained_cfg`` mean / std, ImageNet's when it
    has none)."""
    if name == "model":
        cfg = getattr(model, "pretrained_cfg", None) or {}
        pair = (tuple(cfg["mean"]), tuple(cfg["std"])) if "mean" in cfg and "std" in cfg else NORMALIZATIONS["imagenet"]
    elif name in NORMALIZATIONS:
        pair = NORMALIZATIONS[name]
    else:
        raise ValueError(f"data.normalize={name!r} is not known; choose from {[*NORMALIZATIONS, 'model']}")
    if pair is None:
        return None, None
    mean, std = pair
    if channels == 1 and len(mean) == 3:
        w = (0.299, 0.587, 0.114)
        mean, std = (sum(a * b for a, b in zip(w, mean)),), (sum(a * b for a, b in zip(w, std)),)
    if len(mean) != channels:
        raise ValueError(f"normalisation {name!r} has {len(mean)} channels but the model takes {channels}")
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def open_image(path: str | Path, channels: int):
    """A PIL image in mode ``L`` (``channels=1``) or ``RGB`` (3). 16-bit and 32-bit integer
    greyscale (``I;16``, ``I``) are scaled from their full range and float (``F``) is clipped to
    [0, 1] before the 8-bit conversion, so deep images are not binarised; palette, alpha and CMYK
    images go through PIL's own conversion."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if im.mode.startswith("I;16") or im.mode in ("I", "F"):
            arr = np.asarray(im, dtype=np.float64)
            if im.mode.startswith("I;16"):
                arr = arr / 65535.0
            elif im.mode == "I":
                arr = arr / max(1.0, float(arr.max())) if arr.max() > 255 else arr / 255.0
            arr = np.clip(arr, 0.0, 1.0)
            im = Image.fromarray(np.round(arr * 255).astype(np.uint8), mode="L")
        return im.convert("L" if channels == 1 else "RGB")


def _to_tensor(im) -> Tensor:
    """PIL ``L`` / ``RGB`` -> ``(C, H, W)`` float32 in [0, 1]."""
    arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(arr[None].copy() if arr.ndim == 2 else arr.transpose(2, 0, 1).copy())


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input (see the module docstring).

    ``mean`` / ``std`` ``None``: inputs stay in [0, 1] (the bundled data sets' convention)."""

    size: int
    channels: int
    resize: Literal["squash", "crop"] = "squash"
    crop_pct: float = 0.875
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    source: str = field(default="", compare=False)  # where it came from, for the start-up line

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"image size must be >= 1, got {self.size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.resize not in ("squash", "crop"):
            raise ValueError(f"resize must be 'squash' or 'crop', got {self.resize!r}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        if self.mean is not None and (len(self.mean) != self.channels or len(self.std) != self.channels):
            raise ValueError(f"mean/std need {self.channels} values, got {self.mean} / {self.std}")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("source")
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        d = dict(d)
        for k in ("mean", "std"):
            if d.get(k) is not None:
                d[k] = tuple(float(v) for v in d[k])
        return cls(**{k: v for k, v in d.items() if k in {"size", "channels", "resize", "crop_pct", "mean", "std"}})

    def describe(self) -> str:
        how = "squashed to" if self.resize == "squash" else f"shorter side to {round(self.size / self.crop_pct)}, " \
                                                            "centre-cropped to"
        norm = "no normalisation" if self.mean is None else f"mean {list(self.mean)} std {list(self.std)}"
        return f"{self.channels} channel(s), {how} {self.size}x{self.size} px (bilinear), {norm}"

    # ------------------------------------------------------------------ applying it
    def geometry(self, x: Tensor) -> Tensor:
        """Channels and size of ``(C, H, W)`` or ``(N, C, H, W)`` float images in [0, 1],
        without normalisation (augmentations run between this and :meth:`normalize`)."""
        from torchvision.transforms.v2 import functional as TF

        from .transforms import adapt

        batched = x.dim() == 4
        x = x if batched else x[None]
        if self.resize == "crop":
            x = adapt(x, channels=self.channels)
            short = round(self.size / self.crop_pct)
            if min(x.shape[-2:]) != short:
                x = TF.resize(x, [short], antialias=True)
            x = TF.center_crop(x, [self.size, self.size]).contiguous()
        else:
            x = adapt(x, channels=self.channels, size=self.size)
        x = x.clamp(0.0, 1.0)  # interpolation can round a hair past the range (1.0000001)
        return x if batched else x[0]

    def normalize(self, x: Tensor) -> Tensor:
        if self.mean is None:
            return x
        shape = (-1, 1, 1) if x.dim() == 3 else (1, -1, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return (x - mean) / std

    def __call__(self, x: Tensor) -> Tensor:
        """In-memory images (``(C, H, W)`` or ``(N, C, H, W)`` in [0, 1]) -> model input."""
        return self.normalize(self.geometry(x))

    def read(self, path: str | Path) -> Tensor:
        """One image file -> ``(C, size, size)`` model input, exactly as training's evaluation
        and ``predict`` prepare it."""
        return self(_to_tensor(open_image(path, self.channels)))
