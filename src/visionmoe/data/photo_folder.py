"""An ImageNet-layout folder of real JPEGs, made from the photographs that ship with
scikit-image and scikit-learn: for trying the streaming pipeline, the full-size configs and
loader throughput without downloading ImageNet."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .sources import PHOTOS

__all__ = ["make_photo_folder"]


def make_photo_folder(root: str | Path, *, per_class: int = 20, val_per_class: int = 5, min_size: int = 256,
                      max_size: int = 500, seed: int = 0, quality: int = 90) -> Path:
    """Write ``root/train/<photo>/<i>.jpg`` and ``root/val/<photo>/<i>.jpg``: one class per
    bundled photo (10), each image a random crop (random position, scale and aspect ratio 3/4
    to 4/3) resized so that its longer side is between ``min_size`` and ``max_size`` px.
    Returns ``root``. Training on it is a sanity check (the class is the source photo), not a
    benchmark of accuracy."""
    import skimage.data as skd
    from PIL import Image
    from sklearn.datasets import load_sample_images

    if per_class < 1 or val_per_class < 0 or not 16 <= min_size <= max_size:
        raise ValueError("need per_class >= 1, val_per_class >= 0 and 16 <= min_size <= max_size")
    photos = [getattr(skd, n)() for n in PHOTOS] + list(load_sample_images().images)
    names = list(PHOTOS) + ["china", "flower"]
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for name, img in zip(names, photos):
            if img.ndim == 2:
                img = np.stack([img] * 3, -1)
            img = img[..., :3]
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            h, w = img.shape[:2]
            for i in range(count):
                ratio = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
                ch = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
                cw = min(w, max(8, int(ch * ratio)))
                r, c = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
                crop = Image.fromarray(np.ascontiguousarray(img[r : r + ch, c : c + cw]))
                longer = int(rng.integers(min_size, max_size + 1))
                scale = longer / max(ch, cw)
                crop = crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BICUBIC)
                crop.save(folder / f"{i:04d}.jpg", quality=quality)
    return root
