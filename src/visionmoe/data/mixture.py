"""Several sources combined into one pool, with the source of every image kept
(MoCE's diverse pre-training set; its downstream tasks are the single sources)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .sources import TensorSplits
from .transforms import adapt

__all__ = ["Mixture", "make_mixture"]


@dataclass
class Mixture:
    """A pool of images from several sources at one size and channel count.

    ``y_*`` are labels offset per source (so they never collide: source i's classes start
    at ``offsets[i]``), ``s_*`` are source indices.
    """

    x_train: Tensor
    y_train: Tensor
    s_train: Tensor
    x_test: Tensor
    y_test: Tensor
    s_test: Tensor
    sources: list[str]
    offsets: list[int]
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def as_splits(self, label: str = "class") -> TensorSplits:
        """View as a labelled set; ``label="source"`` classifies the source instead."""
        if label == "source":
            return TensorSplits("mixture", self.x_train, self.s_train, self.x_test, self.s_test, list(self.sources))
        return TensorSplits("mixture", self.x_train, self.y_train, self.x_test, self.y_test, list(self.classes))


def make_mixture(
    sources: list[TensorSplits], *, size: int = 32, channels: int = 3, per_source: int | None = None, seed: int = 0
) -> Mixture:
    """Combine sources, resizing every image to ``size`` and ``channels``; ``per_source``
    caps the training images taken from each source (random, by ``seed``)."""
    if not sources:
        raise ValueError("a mixture needs at least one source")
    g = torch.Generator().manual_seed(seed)
    parts: dict[str, list] = {k: [] for k in ("xtr", "ytr", "str", "xte", "yte", "ste")}
    offsets, classes, offset = [], [], 0
    for i, s in enumerate(sources):
        xtr, ytr = s.x_train, s.y_train
        if per_source is not None and len(xtr) > per_source:
            idx = torch.randperm(len(xtr), generator=g)[:per_source]
            xtr, ytr = xtr[idx], ytr[idx]
        parts["xtr"].append(adapt(xtr, channels=channels, size=size))
        parts["ytr"].append(ytr + offset)
        parts["str"].append(torch.full_like(ytr, i))
        parts["xte"].append(adapt(s.x_test, channels=channels, size=size))
        parts["yte"].append(s.y_test + offset)
        parts["ste"].append(torch.full_like(s.y_test, i))
        offsets.append(offset)
        classes += [f"{s.name}:{c}" for c in s.classes]
        offset += s.num_classes
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return Mixture(cat["xtr"], cat["ytr"], cat["str"], cat["xte"], cat["yte"], cat["ste"],
                   [s.name for s in sources], offsets, classes)
