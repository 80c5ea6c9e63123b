"""Real images that ship offline inside packages, users' own folders, mixtures and transforms.

Every source loads into memory as :class:`TensorSplits` (float images in [0, 1],
``(N, C, H, W)``, long labels, class names); :func:`adapt` makes any of them fit any model.
"""

from .folder import load_image_folder, load_segmentation_folder, read_image
from .mixture import Mixture, make_mixture
from .registry import DATASETS, list_datasets, load_dataset
from .scenes import IGNORE_INDEX, make_scenes
from .sources import (
    TensorSplits,
    from_numpy,
    load_digits,
    load_faces,
    load_fashion_mnist,
    load_mnist5k,
    load_photos,
    load_textures,
    read_idx,
)
from .transforms import ImageTensorDataset, adapt, build_train_transform

__all__ = [
    "TensorSplits",
    "DATASETS",
    "list_datasets",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist5k",
    "load_textures",
    "load_faces",
    "load_photos",
    "load_image_folder",
    "read_image",
    "load_segmentation_folder",
    "make_scenes",
    "IGNORE_INDEX",
    "from_numpy",
    "read_idx",
    "Mixture",
    "make_mixture",
    "adapt",
    "build_train_transform",
    "ImageTensorDataset",
]
