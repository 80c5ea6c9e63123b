"""Data for the training loop: in-memory tensors and lazily read folders behind one interface.

* :class:`FolderData` indexes a torchvision ``ImageFolder`` / ImageNet layout
  (``root/<class>/<image>``, optional ``test_root``) without reading a pixel;
  :class:`SegmentationFolderData` an ADE20K layout (``images/`` + ``annotations/``). Their images
  are decoded by ``torch.utils.data.DataLoader`` workers, one batch at a time.
* :class:`~visionmoe.data.TensorSplits` (the small bundled sets) stays in memory.

:func:`training_set` / :func:`eval_set` turn either into a map-style ``Dataset`` that yields
``(image, target[, routing_key])`` model inputs; :class:`StepBatchSampler` gives every training
step its batch: the order of an epoch is a permutation drawn from ``(seed, epoch)``, each rank
takes its strided share, and the loader can start at any step. Every training sample's
augmentation is seeded from ``(seed, epoch, index)``, so the images of a step do not depend on
the number of workers, on which worker decoded them, or on where a run was resumed.

Axis legend: N images, C channels, H height, W width.
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .preprocess import Preprocessing, _to_tensor, open_image
from .sources import TensorSplits, _split

__all__ = ["FolderData", "SegmentationFolderData", "open_image_folder", "open_segmentation_folder", "training_set",
           "eval_set", "StepBatchSampler", "train_loader", "eval_batches", "sample_seed", "native_shape",
           "build_augment"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# ---------------------------------------------------------------------------- folder indexes
@dataclass
class FolderData:
    """An image-classification folder, indexed but not read: ``(path, label)`` per split."""

    name: str
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    classes: list[str]
    channels: int = 3
    segmentation: bool = False
    on_error: str = "skip"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        return f"FolderData({self.name!r}, train={len(self.train)}, test={len(self.test)}, classes={self.num_classes})"


@dataclass
class SegmentationFolderData(FolderData):
    """An ADE20K-layout folder: ``(image path, label-map path)`` per split."""

    train: list[tuple[str, str]]
    test: list[tuple[str, str]]
    reduce_zero_label: bool = False
    segmentation: bool = True


def _index(folder: Path) -> tuple[list[tuple[str, int]], list[str]]:
    from torchvision.datasets.folder import find_classes, make_dataset

    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    try:
        classes, to_idx = find_classes(str(folder))
        samples = make_dataset(str(folder), to_idx, extensions=IMAGE_EXTENSIONS)
    except FileNotFoundError as e:
        raise ValueError(f"{folder} holds no images in class sub-folders (expected {folder}/<class>/<image>.jpg): "
                         f"{e}") from e
    seen: set[str] = set()
    unique = []
    for path, label in samples:  # the same file reached twice (a symlink) is one sample
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            unique.append((path, label))
    return unique, classes


def open_image_folder(root: str | Path, *, test_root: str | Path | None = None, test_fraction: float = 0.2,
                      seed: int = 0, channels: int = 3, size: int | None = None,
                      on_error: str = "skip") -> FolderData:
    """Index ``root/<class>/<image>`` (and ``test_root``, or a stratified ``test_fraction``
    split seeded by ``seed``) for streaming. ``channels``: 1 (greyscale) or 3 (RGB). ``size`` is
    accepted for old configs and ignored: images are resized once, to the model's input size
    (``data.img_size``). ``on_error``: ``"skip"`` replaces an unreadable file by the next
    readable one (with a warning naming it); ``"raise"`` stops the run."""
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    root = Path(root)
    train, classes = _index(root)
    if test_root is not None:
        test, test_classes = _index(Path(test_root))
        if test_classes != classes:
            raise ValueError(f"test folder classes {test_classes[:5]}... differ from training classes {classes[:5]}...")
        overlap = {os.path.realpath(p) for p, _ in train} & {os.path.realpath(p) for p, _ in test}
        if overlap:
            raise ValueError(f"{len(overlap)} file(s) are in both {root} and {test_root}, e.g. {sorted(overlap)[0]}; "
                             "train and test must not share images")
    else:
        # the bundled sets' stratified split (sources._split), on sample indices
        tr, _, te, _ = _split(np.arange(len(train)), np.asarray([lab for _, lab in train]), test_fraction, seed)
        train, test = [train[i] for i in tr], [train[i] for i in te]
    if size is not None:
        warnings.warn(f"data.args.size={size} is ignored: folder images are resized once, to the model's input size "
                      "(set data.img_size to change it)", stacklevel=2)
    return FolderData(root.name, train, test, list(classes), channels=channels, on_error=on_error)


def open_segmentation_folder(root: str | Path, *, images: str = "images", masks: str = "annotations",
                             channels: int = 3, classes: list[str] | None = None, num_classes: int | None = None,
                             test_fraction: float = 0.2, seed: int = 0, reduce_zero_label: bool = False,
                             size: int | None = None) -> SegmentationFolderData:
    """Index an ADE20K-layout folder (``root/images/<name>.jpg`` + ``root/annotations/<name>.png``,
    with ``training/`` and ``validation/`` sub-folders as the splits when present). The class
    count comes from ``classes`` / ``num_classes``, or from one pass over the label maps."""
    root = Path(root)
    if not (root / images).is_dir() or not (root / masks).is_dir():
        raise FileNotFoundError(f"expected {root}/{images}/ and {root}/{masks}/ (image and label-map folders)")

    def pairs(img_dir: Path, mask_dir: Path) -> list[tuple[str, str]]:
        out, missing = [], 0
        for p in sorted(q for q in img_dir.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS):
            m = mask_dir / f"{p.stem}.png"
            if m.is_file():
                out.append((str(p), str(m)))
            else:
                missing += 1
        if missing:
            warnings.warn(f"{missing} image(s) in {img_dir} have no label map in {mask_dir}; skipped", stacklevel=3)
        if not out:
            raise ValueError(f"no image with a label map in {img_dir} / {mask_dir}")
        return out

    if (root / images / "training").is_dir():
        train = pairs(root / images / "training", root / masks / "training")
        test = pairs(root / images / "validation", root / masks / "validation")
    else:
        everything = pairs(root / images, root / masks)
        perm = torch.randperm(len(everything), generator=torch.Generator().manual_seed(seed)).tolist()
        n_test = int(round(test_fraction * len(everything)))
        test, train = [everything[i] for i in perm[:n_test]], [everything[i] for i in perm[n_test:]]
    if classes is None:
        if num_classes is None:
            num_classes = _infer_num_classes([m for _, m in train + test], reduce_zero_label)
        classes = [str(i) for i in range(num_classes)]
    return SegmentationFolderData(root.name, train, test, list(classes), channels=channels,
                                  reduce_zero_label=reduce_zero_label)


def _read_mask(path: str, size: int | None, reduce_zero_label: bool, num_classes: int | None = None) -> np.ndarray:
    """A label map as class ids (255: ignore); with ``num_classes``, an id outside
    ``0..num_classes-1`` is refused naming the file (a stray value must not train as a class)."""
    from PIL import Image

    with Image.open(path) as im:
        if size is not None:
            im = im.resize((size, size), Image.NEAREST)
        lab = np.asarray(im, dtype=np.int64)
    if lab.ndim != 2:
        raise ValueError(f"label map {path} must be single-channel class ids, got shape {lab.shape}")
    if reduce_zero_label:
        lab = np.where(lab == 0, 255, lab - 1)
    if num_classes is not None:
        bad = lab[(lab >= num_classes) & (lab != 255)]
        if bad.size:
            raise ValueError(f"label map {path} has class id {int(bad.max())}, outside 0..{num_classes - 1} (255 = "
                             "ignore); fix the file, map it to 255, or give the right num_classes")
    return lab


def _labels(path: str, reduce_zero_label: bool) -> set[int]:
    lab = _read_mask(path, None, reduce_zero_label)
    return set(np.unique(lab[lab != 255]).tolist())


def _infer_num_classes(masks: list[str], reduce_zero_label: bool) -> int:
    """``1 + the largest id`` over the label maps; refused when the largest id looks like a
    stray value: at least 16 and more than twice (the next largest + 1)."""
    where: dict[int, str] = {}  # class id -> the first label map that has it
    for m in masks:
        for v in _labels(m, reduce_zero_label):
            where.setdefault(v, m)
    seen = set(where)
    if not seen:
        return 1
    top = max(seen)
    rest = seen - {top}
    if rest and top >= 16 and top > 2 * (max(rest) + 1):
        raise ValueError(f"the label maps use class ids up to {max(rest)} and then {top} (first in {where[top]}): a "
                         f"stray value would make {top + 1} classes; give num_classes= (ids at or above it are "
                         "refused) or classes=, or fix that file")
    return top + 1


def native_shape(data: Any) -> tuple[int, int | None]:
    """``(channels, native size or None)`` of a data set before any preprocessing."""
    if isinstance(data, FolderData):
        return data.channels, None
    return int(data.x_train.shape[1]), int(data.x_train.shape[-1])


# ---------------------------------------------------------------------------- augmentation
def build_augment(kind: str, prep: Preprocessing, data: Any, *, auto_augment: str | None = None,
                  reprob: float = 0.0):
    """``(tensor_transform, pil_transform)`` for a training set; at most one is not ``None``.

    In-memory sets and the light kinds (``basic``, ``flip``, ``shift``) augment the
    preprocessed tensor (torchvision v2). A folder with ``rrc`` uses timm's
    ``create_transform`` on the decoded image (RandomResizedCrop from the full-size picture,
    flip, ``auto_augment`` such as ``rand-m9-mstd0.5-inc1``, random erasing ``reprob``,
    normalised with the preprocessing's mean / std)."""
    from .transforms import build_train_transform

    if isinstance(data, FolderData) and not data.segmentation and kind == "rrc":
        from timm.data import create_transform

        mean = prep.mean or (0.0,) * prep.channels
        std = prep.std or (1.0,) * prep.channels
        return None, create_transform((prep.channels, prep.size, prep.size), is_training=True, hflip=0.5,
                                      auto_augment=auto_augment, re_prob=reprob, interpolation="bilinear",
                                      mean=mean, std=std)
    if auto_augment or reprob:
        raise ValueError("data.auto_augment and data.reprob apply to image folders with data.augment=rrc (timm's "
                         "create_transform); in-memory sets use data.augment=basic|flip|shift|rrc")
    return build_train_transform(kind, prep.size), None


# ---------------------------------------------------------------------------- datasets
def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one training sample (a fixed mix of run seed, epoch, index)."""
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729 + 0x9E3779B9) % (2**63 - 1)


class _Seeded:
    """Seed python / numpy / torch for one sample; in the main process the caller's RNG
    states are put back afterwards (worker processes own theirs)."""

    def __init__(self) -> None:
        self.saved = None

    def __enter__(self):
        if torch.utils.data.get_worker_info() is None:
            self.saved = (torch.get_rng_state(), random.getstate(), np.random.get_state())  # noqa: NPY002
        return self

    @staticmethod
    def seed(s: int) -> None:
        # the CPU generator only, the one CPU transforms draw from: as torch.manual_seed for them,
        # but ~2 us instead of ~0.4 ms (torch.manual_seed also seeds every accelerator backend),
        # which made per-sample seeding cost more than a small model's training step
        torch.default_generator.manual_seed(s)
        random.seed(s)
        np.random.seed(s % 2**32)  # noqa: NPY002 - the legacy global RNG is what transforms use

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            torch.set_rng_state(self.saved[0])
            random.setstate(self.saved[1])
            np.random.set_state(self.saved[2])  # noqa: NPY002


class ModelInputs(Dataset):
    """Map-style dataset of model inputs. Index by ``int`` (no augmentation: evaluation) or by
    ``(epoch, index)`` (training: augmentation seeded by :func:`sample_seed`)."""

    def __init__(self, data: Any, split: str, prep: Preprocessing, *, seed: int = 0, tensor_transform=None,
                 pil_transform=None) -> None:
        self.prep, self.seed = prep, seed
        self.tensor_transform, self.pil_transform = tensor_transform, pil_transform
        self.folder = isinstance(data, FolderData)
        self.segmentation = getattr(data, "segmentation", False)
        self.reduce_zero_label = getattr(data, "reduce_zero_label", False)
        self.num_classes = int(data.num_classes) if self.segmentation else None
        self.on_error = getattr(data, "on_error", "raise")
        if self.folder:
            self.items = data.train if split == "train" else data.test
            self.x = self.y = self.keys = None
        else:
            x = data.x_train if split == "train" else data.x_test
            self.x = prep.geometry(x) if len(x) else x  # (N, C, size, size), resized once, in [0, 1]
            self.y = data.y_train if split == "train" else data.y_test
            self.keys = data.keys_train if split == "train" else data.keys_test
            self.items = None

    def __len__(self) -> int:
        return len(self.items) if self.folder else len(self.x)

    def _load(self, i: int, augment: bool) -> tuple:
        if not self.folder:
            return self._load_one(i, augment)
        for attempt in range(len(self)):
            j = (i + attempt) % len(self)
            try:
                return self._load_one(j, augment)
            except (OSError, ValueError) as e:
                if self.on_error == "raise":
                    raise ValueError(f"cannot read image {self.items[j][0]}: {e}") from e
                warnings.warn(f"skipped unreadable file {self.items[j][0]} ({e}); using the next image", stacklevel=2)
        raise ValueError("no readable image in the folder")

    def _load_one(self, i: int, augment: bool) -> tuple:
        if self.folder:
            path, target = self.items[i]
            im = open_image(path, self.prep.channels)
            if augment and self.pil_transform is not None:
                return (self.pil_transform(im), target)
            img = self.prep.geometry(_to_tensor(im))
            if self.segmentation:
                target = torch.from_numpy(_read_mask(target, self.prep.size, self.reduce_zero_label,
                                                     self.num_classes))
        else:
            img, target = self.x[i], self.y[i]
        if augment and self.tensor_transform is not None:
            img = self.tensor_transform(img)
        out = (self.prep.normalize(img), target)
        return out + (self.keys[i],) if self.keys is not None else out

    def __getitem__(self, key):
        if isinstance(key, (tuple, list)):
            epoch, i = key
            with _Seeded():
                _Seeded.seed(sample_seed(self.seed, epoch, i))
                return self._load(i, augment=True)
        return self._load(int(key), augment=False)

    def __getitems__(self, keys: list) -> Any:
        """A whole batch at once: in-memory images without augmentation are one gather; the
        others are loaded one by one with one save / restore of the RNG states."""
        train = bool(keys) and isinstance(keys[0], (tuple, list))
        idx = [k[1] if train else int(k) for k in keys]
        if not self.folder and (not train or self.tensor_transform is None):
            t = torch.as_tensor(idx, dtype=torch.long)
            out = (self.prep.normalize(self.x[t]), self.y[t])
            return _Batch(out + (self.keys[t],) if self.keys is not None else out)
        if not train:
            return [self._load(i, augment=False) for i in idx]
        items = []
        with _Seeded():
            for epoch, i in keys:
                _Seeded.seed(sample_seed(self.seed, epoch, i))
                items.append(self._load(i, augment=True))
        return items


class _Batch(tuple):
    """An already collated batch (``collate`` passes it through)."""


def collate(items):
    if isinstance(items, _Batch):
        return tuple(items)
    from torch.utils.data import default_collate

    return tuple(default_collate(items))


def training_set(data: Any, prep: Preprocessing, *, seed: int, augment: str = "none",
                 auto_augment: str | None = None, reprob: float = 0.0) -> ModelInputs:
    tensor_t, pil_t = build_augment(augment, prep, data, auto_augment=auto_augment, reprob=reprob)
    return ModelInputs(data, "train", prep, seed=seed, tensor_transform=tensor_t, pil_transform=pil_t)


def eval_set(data: Any, prep: Preprocessing) -> ModelInputs:
    return ModelInputs(data, "test", prep)


# ---------------------------------------------------------------------------- order and loaders
class StepBatchSampler(Sampler):
    """Yields, for each step from ``start`` to ``stop``, this rank's ``(epoch, index)`` pairs of
    the global batch: epoch ``e``'s order is ``randperm(n)`` seeded by ``(seed, e)``, step ``s``
    of the epoch takes its ``batch_size`` slice and the rank its ``rank::world`` share."""

    def __init__(self, n: int, batch_size: int, *, seed: int, start: int, stop: int, rank: int = 0,
                 world: int = 1) -> None:
        if batch_size < 1 or n < batch_size:
            raise ValueError(f"a batch of {batch_size} needs at least as many training images (have {n})")
        self.n, self.bs, self.seed, self.start, self.stop = n, batch_size, seed, start, stop
        self.rank, self.world = rank, world
        self.steps_per_epoch = n // batch_size
        self._order: tuple[int | None, Tensor | None] = (None, None)

    def order(self, epoch: int) -> Tensor:
        """The permutation of epoch ``epoch`` (the last one drawn is kept: one draw per epoch)."""
        if self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(self.n, generator=g))
        return self._order[1]

    def indices(self, step: int) -> list[tuple[int, int]]:
        epoch, i = divmod(step, self.steps_per_epoch)
        idx = self.order(epoch)[i * self.bs : (i + 1) * self.bs][self.rank :: self.world]
        return [(epoch, int(j)) for j in idx]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.stop):
            yield self.indices(step)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def train_loader(ds: ModelInputs, sampler: StepBatchSampler, *, workers: int, pin_memory: bool) -> DataLoader:
    # its own generator: creating the iterator must not draw from the global RNG (exact resume)
    return DataLoader(ds, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory, collate_fn=collate,
                      prefetch_factor=4 if workers else None, generator=torch.Generator().manual_seed(sampler.seed))


def eval_batches(ds: ModelInputs, batch_size: int, *, rank: int = 0, world: int = 1, workers: int = 0,
                 pin_memory: bool = False, persistent: bool = False) -> tuple[DataLoader, int, int]:
    """``(loader, lo, hi)``: this rank's contiguous share ``[lo, hi)`` of the test set in batches
    (``persistent``: the workers stay up between passes, for a loader evaluated many times)."""
    share = -(-len(ds) // world)
    lo, hi = rank * share, min(len(ds), (rank + 1) * share)
    batches = [list(range(i, min(i + batch_size, hi))) for i in range(lo, hi, batch_size)]
    n = workers if ds.folder and batches else 0
    loader = DataLoader(ds, batch_sampler=batches, num_workers=n, pin_memory=pin_memory, collate_fn=collate,
                        generator=torch.Generator().manual_seed(0), persistent_workers=persistent and n > 0)
    return loader, lo, hi


def default_workers(data: Any) -> int:
    """Loader processes when ``data.workers`` is not set: none for in-memory sets (a gather is
    faster than a process hop), up to 4 for folders (timm's default)."""
    return min(4, os.cpu_count() or 1) if isinstance(data, FolderData) else 0


def ensure_tensor_splits(data: Any, what: str) -> TensorSplits:
    if isinstance(data, FolderData):
        raise ValueError(f"{what} needs an in-memory data set; {data.name!r} is a streamed folder")
    return data
