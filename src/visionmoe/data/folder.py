"""A user's folder of class sub-folders, read with torchvision's ``ImageFolder`` (PIL)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from .sources import TensorSplits, _split
from .streaming import _read_mask

__all__ = ["load_image_folder", "load_segmentation_folder", "read_image"]


def read_image(path: str | Path, *, size: int, channels: int = 3) -> np.ndarray:
    """One image file (any PIL format) as ``(channels, size, size)`` float32 in [0, 1]:
    :meth:`Preprocessing.read <visionmoe.data.Preprocessing.read>` with the whole image squashed
    to ``size`` and no normalisation, exactly as :func:`load_image_folder` and the streamed
    folders read images. Unreadable files raise PIL's error."""
    from .preprocess import Preprocessing

    return Preprocessing(size, channels).read(path).numpy()


def load_image_folder(
    root: str | Path,
    *,
    size: int = 32,
    channels: int = 3,
    test_root: str | Path | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    on_error: str = "skip",
) -> TensorSplits:
    """Load ``root/<class>/<image>`` (RGB or greyscale, any PIL format), resized to
    ``size x size``, into memory.

    Args:
        root: the training folder (or the only folder, split by ``test_fraction``).
        test_root: an optional separate test folder with the same class names.
        channels: 1 (greyscale) or 3 (RGB).
        on_error: ``"skip"`` (default) counts and reports unreadable files and goes on;
            ``"raise"`` stops at the first one.
    """
    from torchvision.datasets import ImageFolder

    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")

    def _read(folder):
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder {folder} does not exist")
        try:
            ds = ImageFolder(str(folder), loader=lambda p: p)  # paths only; we read them below
        except FileNotFoundError as e:
            raise ValueError(
                f"{folder} holds no images in class sub-folders (expected {folder}/<class>/<image>.png): {e}"
            ) from e
        xs, ys, bad = [], [], []
        for path, label in ds.samples:
            try:
                xs.append(read_image(path, size=size, channels=channels))
            except Exception as e:  # noqa: BLE001 - any unreadable file is reported, not fatal
                if on_error == "raise":
                    raise ValueError(f"cannot read image {path}: {e}") from e
                bad.append(path)
                continue
            ys.append(label)
        if bad:
            warnings.warn(f"skipped {len(bad)} unreadable file(s) in {folder}, e.g. {bad[0]}", stacklevel=3)
        if not xs:
            raise ValueError(f"no readable images in {folder}")
        return np.stack(xs), np.asarray(ys, dtype=np.int64), ds.classes, len(bad)

    x, y, classes, _ = _read(root)
    if test_root is not None:
        xte, yte, test_classes, _ = _read(test_root)
        if test_classes != classes:
            raise ValueError(f"test folder classes {test_classes} differ from training classes {classes}")
        xtr, ytr = x, y
    else:
        xtr, ytr, xte, yte = _split(x, y, test_fraction, seed)
    return TensorSplits(Path(root).name, *map(torch.from_numpy, (xtr, ytr, xte, yte)), list(classes))


def load_segmentation_folder(
    root: str | Path,
    *,
    images: str = "images",
    masks: str = "annotations",
    size: int = 64,
    channels: int = 3,
    classes: list[str] | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    reduce_zero_label: bool = False,
) -> TensorSplits:
    """A user's segmentation folder: ``root/<images>/<name>.<ext>`` with a label map
    ``root/<masks>/<name>.png`` (one class id per pixel, 255 = ignore) for each image, as in
    ADE20K's ``images/`` + ``annotations/``. Images are resized bilinearly, masks by nearest
    neighbour, to ``size x size``. With ``training/`` and ``validation/`` sub-folders under
    both, those are the splits; otherwise a seeded ``test_fraction`` split.
    ``reduce_zero_label`` maps 0 to 255 and shifts the rest down (ADE20K's convention: 0 is
    "other")."""

    root = Path(root)
    if not (root / images).is_dir() or not (root / masks).is_dir():
        raise FileNotFoundError(f"expected {root}/{images}/ and {root}/{masks}/ (image and label-map folders)")

    def _read(img_dir: Path, mask_dir: Path):
        xs, ys, missing = [], [], 0
        for p in sorted(q for q in img_dir.iterdir() if q.is_file()):
            m = mask_dir / f"{p.stem}.png"
            if not m.is_file():
                missing += 1
                continue
            xs.append(read_image(p, size=size, channels=channels))
            ys.append(_read_mask(str(m), size, reduce_zero_label))  # as the streamed folders read them
        if missing:
            warnings.warn(f"{missing} image(s) in {img_dir} have no label map in {mask_dir}; skipped", stacklevel=3)
        if not xs:
            raise ValueError(f"no image with a label map in {img_dir} / {mask_dir}")
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))

    if (root / images / "training").is_dir():
        xtr, ytr = _read(root / images / "training", root / masks / "training")
        xte, yte = _read(root / images / "validation", root / masks / "validation")
    else:
        x, y = _read(root / images, root / masks)
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(x), generator=g)
        n_test = int(round(test_fraction * len(x)))
        xtr, ytr, xte, yte = x[perm[n_test:]], y[perm[n_test:]], x[perm[:n_test]], y[perm[:n_test]]
    if classes is None:
        valid = torch.cat([ytr.flatten(), yte.flatten()])
        k = int(valid[valid != 255].max()) + 1 if (valid != 255).any() else 1
        classes = [str(i) for i in range(k)]
    return TensorSplits(root.name, xtr, ytr, xte, yte, list(classes))
