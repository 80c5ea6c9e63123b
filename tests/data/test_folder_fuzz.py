"""Property tests of a user's image folder: any mix of sizes, modes, formats and junk files."""

import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from visionmoe.data import load_image_folder, read_image

MODES = ["L", "RGB", "RGBA", "P", "I;16", "1"]
JUNK = [b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, b"GIF89a" + bytes(range(50))]

image = st.tuples(st.sampled_from(MODES), st.integers(1, 40), st.integers(1, 40),
                  st.sampled_from(["png", "bmp", "tiff"]), st.integers(0, 2**31 - 1))
folder = st.lists(st.tuples(st.integers(0, 2), image), min_size=1, max_size=12)


def _write(path: Path, mode: str, w: int, h: int, fmt: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    im = Image.fromarray(arr, "RGB").convert(mode)
    if fmt == "bmp" and mode in ("RGBA", "I;16"):
        fmt = "png"
    im.save(path.with_suffix("." + fmt))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=folder, junk=st.lists(st.sampled_from(JUNK), max_size=3), size=st.integers(4, 16),
       channels=st.sampled_from([1, 3]))
def test_any_folder_loads_with_every_good_image_and_counts_the_bad(files, junk, size, channels):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i, (cls, (mode, w, h, fmt, seed)) in enumerate(files):
            (root / f"class{cls}").mkdir(exist_ok=True)
            _write(root / f"class{cls}" / f"img{i}", mode, w, h, fmt, seed)
        first = root / f"class{files[0][0]}"
        for j, data in enumerate(junk):
            (first / f"junk{j}.png").write_bytes(data)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            d = load_image_folder(root, size=size, channels=channels, test_fraction=0.0)
        n = len(files)
        assert len(d.x_train) + len(d.x_test) == n  # every good image, nothing else
        assert d.x_train.shape[1:] == (channels, size, size)
        assert float(d.x_train.min()) >= 0.0 and float(d.x_train.max()) <= 1.0
        assert d.classes == sorted({f"class{c}" for c, _ in files})
        assert sorted(d.y_train.tolist() + d.y_test.tolist()) == sorted(
            d.classes.index(f"class{c}") for c, _ in files)
        skipped = [str(w.message) for w in caught if "unreadable" in str(w.message)]
        if junk:
            assert skipped and f"skipped {len(junk)} unreadable" in skipped[0]
        else:
            assert not skipped


def test_raise_mode_names_the_bad_file(tmp_path):
    (tmp_path / "a").mkdir()
    _write(tmp_path / "a" / "ok", "RGB", 8, 8, "png", 0)
    (tmp_path / "a" / "broken.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        load_image_folder(tmp_path, on_error="raise")


def test_empty_and_missing_folders_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "nope")
    with pytest.raises(ValueError, match="no images in class sub-folders"):
        load_image_folder(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"junk")
    with pytest.warns(UserWarning, match="skipped 1"), pytest.raises(ValueError, match="no readable images"):
        load_image_folder(tmp_path)


def test_read_image_matches_the_folder_loader(tmp_path):
    (tmp_path / "a").mkdir()
    _write(tmp_path / "a" / "im", "RGB", 13, 9, "png", 3)
    d = load_image_folder(tmp_path, size=8, channels=3, test_fraction=0.0)
    x = read_image(tmp_path / "a" / "im.png", size=8, channels=3)
    assert np.array_equal(d.x_train[0].numpy(), x)


def test_segmentation_folder_in_ade20k_layout(tmp_path):
    from visionmoe.data import Preprocessing, load_dataset, load_segmentation_folder
    from visionmoe.data.streaming import collate, eval_set, training_set

    for split, n in (("training", 3), ("validation", 2)):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            _write(tmp_path / "images" / split / f"ADE_{split}_{i}", "RGB", 20, 16, "png", i)
            lab = np.zeros((16, 20), dtype=np.uint8)
            lab[:, 10:] = 3  # right half class 3 (2 after reduce_zero_label); left half 0 = "other"
            Image.fromarray(lab).save(tmp_path / "annotations" / split / f"ADE_{split}_{i}.png")
    _write(tmp_path / "images" / "training" / "orphan", "RGB", 8, 8, "png", 9)  # no label map
    with pytest.warns(UserWarning, match="1 image"):
        d = load_segmentation_folder(tmp_path, size=8, reduce_zero_label=True)
    assert d.x_train.shape == (3, 3, 8, 8) and d.y_train.shape == (3, 8, 8) and len(d.x_test) == 2
    assert set(d.y_train.unique().tolist()) == {2, 255}
    assert (d.y_train[:, :, :4] == 255).all() and (d.y_train[:, :, 5:] == 2).all()
    assert d.classes == ["0", "1", "2"]
    with pytest.warns(UserWarning, match="1 image"):  # streamed: the same images and label maps
        s = load_dataset("segmentation_folder", root=str(tmp_path), reduce_zero_label=True)
    assert s.classes == d.classes and len(s.train) == 3 and len(s.test) == 2
    prep = Preprocessing(8, 3)
    x, y = collate(training_set(s, prep, seed=0).__getitems__([(0, i) for i in range(3)]))
    assert torch.allclose(x, d.x_train, atol=1e-6) and torch.equal(y, d.y_train)
    assert torch.equal(collate(eval_set(s, prep).__getitems__([0, 1]))[1], d.y_test)
    with pytest.raises(FileNotFoundError, match="annotations"):
        load_dataset("segmentation_folder", root=str(tmp_path / "images"))


def test_a_stray_label_value_is_refused_not_a_new_class(tmp_path):
    from visionmoe.data import Preprocessing, load_dataset
    from visionmoe.data.streaming import collate, training_set

    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    for i in range(4):
        _write(tmp_path / "images" / f"s{i}", "RGB", 8, 8, "png", i)
        lab = np.full((8, 8), i % 3, dtype=np.uint8)  # classes 0, 1, 2 ...
        if i == 3:
            lab[0, 0] = 200  # ... and one stray pixel
        Image.fromarray(lab).save(tmp_path / "annotations" / f"s{i}.png")
    with pytest.raises(ValueError, match=r"up to 2 and then 200 .*s3\.png.*num_classes="):
        load_dataset("segmentation_folder", root=str(tmp_path), test_fraction=0.0)
    # with the class count given, the stray id is refused when that label map is read, naming it
    s = load_dataset("segmentation_folder", root=str(tmp_path), num_classes=3, test_fraction=0.0)
    i = next(k for k, (_, m) in enumerate(s.train) if m.endswith("s3.png"))
    ds = training_set(s, Preprocessing(8, 3), seed=0)
    ds.on_error = "raise"
    with pytest.raises(ValueError, match=r"s3\.png.*class id 200, outside 0\.\.2"):
        collate(ds.__getitems__([(0, i)]))
