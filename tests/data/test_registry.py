import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from visionmoe.data import (
    ImageTensorDataset,
    adapt,
    build_train_transform,
    from_numpy,
    list_datasets,
    load_dataset,
    load_image_folder,
    make_mixture,
)
from visionmoe.data.sources import DEFAULT_ROOT


@pytest.mark.parametrize(
    "name, shape, classes",
    [("digits", (1, 8, 8), 10), ("mnist5k", (1, 28, 28), 10), ("textures", (1, 32, 32), 3),
     ("faces", (1, 25, 25), 2), ("photos", (3, 32, 32), 10)],
)
def test_bundled_sources_load(name, shape, classes):
    d = load_dataset(name)
    assert d.x_train.shape[1:] == shape and d.x_test.shape[1:] == shape
    assert d.num_classes == classes
    assert d.x_train.dtype == torch.float32 and 0 <= float(d.x_train.min()) and float(d.x_train.max()) <= 1
    assert int(d.y_train.max()) < classes and int(d.y_train.min()) >= 0
    if name != "photos":  # every class appears in both splits
        assert len(torch.unique(d.y_train)) == classes and len(torch.unique(d.y_test)) == classes


def _fashion_available():
    from pathlib import Path

    return any(Path(p).glob("train-images-idx3-ubyte*") for p in
               (DEFAULT_ROOT / "fashion_mnist", Path("/usr/share/datasets/fashion-mnist")))


@pytest.mark.skipif(not _fashion_available(), reason="Fashion-MNIST not fetched (scripts/fetch_data.sh)")
def test_fashion_mnist_real_files():
    d = load_dataset("fashion_mnist")
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(d.y_train).tolist() == [6000] * 10


def test_textures_splits_share_no_pixels():
    d = load_dataset("textures")
    train = {t.numpy().tobytes() for t in d.x_train[:200]}
    assert not any(t.numpy().tobytes() in train for t in d.x_test)


def test_unknown_dataset_and_argument():
    with pytest.raises(ValueError, match="Did you mean 'digits'"):
        load_dataset("digit")
    with pytest.raises(ValueError, match="does not take"):
        load_dataset("digits", rooot="x")
    assert "image_folder" in list_datasets()


def test_adapt_channels_and_size():
    x = torch.rand(2, 1, 8, 8)
    y = adapt(x, channels=3, size=16)
    assert y.shape == (2, 3, 16, 16) and torch.equal(y[:, 0], y[:, 1])
    g = adapt(torch.ones(1, 3, 4, 4), channels=1)
    torch.testing.assert_close(g, torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="cannot adapt"):
        adapt(torch.rand(1, 2, 4, 4), channels=3)


@pytest.mark.parametrize("kind", ["basic", "flip", "rrc", "shift"])
def test_transforms_keep_labels_and_shapes(kind):
    d = load_dataset("digits")
    x = adapt(d.x_train[:16], size=16)
    ds = ImageTensorDataset(x, d.y_train[:16], build_train_transform(kind, 16))
    for i in range(16):
        img, label = ds[i]
        assert img.shape == (1, 16, 16) and label == d.y_train[i]


def test_shift_gives_torchvisions_random_affine_images_for_the_same_seed():
    """The fast ``shift`` transform draws and warps as ``v2.RandomAffine(10, (0.125, 0.125))``."""
    from torchvision.transforms import v2

    from visionmoe.data.transforms import ShiftRotate

    d = load_dataset("digits")
    x = adapt(d.x_train[:32], size=28)
    ref, fast = v2.RandomAffine(degrees=10, translate=(0.125, 0.125)), build_train_transform("shift", 28)
    assert isinstance(fast, ShiftRotate)
    moved = 0
    for i, img in enumerate(x):
        torch.manual_seed(i)
        a = ref(img)
        torch.manual_seed(i)
        b = fast(img)
        assert torch.equal(a, b), i
        moved += int(not torch.equal(b, img))
    assert moved >= 30  # it does move the images


def test_image_folder_reads_rgb_and_grey_and_skips_bad_files(tmp_path):
    rng = np.random.default_rng(0)
    for c, mode in (("cat", "RGB"), ("dog", "L")):
        (tmp_path / c).mkdir()
        for i in range(5):
            shape = (12, 10, 3) if mode == "RGB" else (12, 10)
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(tmp_path / c / f"{i}.png")
    (tmp_path / "dog" / "broken.png").write_bytes(b"not an image")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        d = load_image_folder(tmp_path, size=16, channels=3, test_fraction=0.2)
    assert any("skipped 1 unreadable" in str(x.message) for x in w)
    assert d.classes == ["cat", "dog"] and len(d.x_train) + len(d.x_test) == 10
    assert d.x_train.shape[1:] == (3, 16, 16)
    with pytest.raises(ValueError, match="cannot read image"):
        load_image_folder(tmp_path, on_error="raise")


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path / "empty")


def test_from_numpy_layouts_and_errors():
    x = np.random.default_rng(0).integers(0, 255, (20, 6, 6, 3), dtype=np.uint8)
    d = from_numpy(x, np.arange(20) % 2)
    assert d.x_train.shape[1:] == (3, 6, 6) and float(d.x_train.max()) <= 1.0
    with pytest.raises(ValueError, match="labels"):
        from_numpy(x, np.arange(3))
    with pytest.raises(ValueError, match="empty"):
        from_numpy(np.zeros((0, 4, 4)), np.zeros(0))


def test_mixture_keeps_sources_and_offsets_labels():
    a, b = load_dataset("digits"), load_dataset("faces")
    m = make_mixture([a, b], size=16, channels=3, per_source=100)
    assert m.x_train.shape == (200, 3, 16, 16)
    assert m.sources == ["digits", "faces"] and m.offsets == [0, 10] and m.num_classes == 12
    assert torch.equal(m.s_train.unique(), torch.tensor([0, 1]))
    assert int(m.y_train[m.s_train == 1].min()) >= 10
    assert m.as_splits("source").num_classes == 2
