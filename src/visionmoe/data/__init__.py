"""Real images that ship offline inside packages, users' own folders, mixtures and transforms.

The bundled sources load into memory as :class:`TensorSplits` (float images in [0, 1],
``(N, C, H, W)``, long labels, class names); users' folders are indexed as :class:`FolderData`
and streamed through ``torch.utils.data.DataLoader``. :class:`Preprocessing` is the one way an
image becomes a model input, from training to prediction.
"""

from .folder import load_image_folder, load_segmentation_folder, read_image
from .mixture import Mixture, make_mixture
from .photo_folder import make_photo_folder
from .preprocess import Preprocessing, open_image
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
from .streaming import FolderData, SegmentationFolderData, open_image_folder, open_segmentation_folder
from .transforms import ImageTensorDataset, adapt, build_train_transform

__all__ = [
    "Preprocessing",
    "make_photo_folder",
    "open_image",
    "FolderData",
    "SegmentationFolderData",
    "open_image_folder",
    "open_segmentation_folder",
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
