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

__all__ = ["TensorSplits", "load_digits", "load_fashion_mnist", "read_idx", "DEFAULT_ROOT"]

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

    @property
    def num_classes(self) -> int:
        return len(self.classes)

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
