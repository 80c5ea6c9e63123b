import gzip
import struct

import numpy as np
import pytest
import torch

from visionmoe.data import load_digits, load_fashion_mnist, read_idx


def test_digits_shapes_classes_and_stratified_split():
    d = load_digits(test_fraction=0.2, seed=0)
    assert d.x_train.shape[1:] == (1, 8, 8) and d.num_classes == 10
    assert len(d.x_train) + len(d.x_test) == 1797
    assert 0.0 <= float(d.x_train.min()) and float(d.x_train.max()) <= 1.0
    counts = torch.bincount(d.y_test, minlength=10)
    assert counts.min() >= 30  # every class present in test
    # same seed -> same split; different seed -> different split
    assert torch.equal(load_digits(seed=0).y_test, d.y_test)
    assert not torch.equal(load_digits(seed=1).x_test, d.x_test)


def _write_idx(path, arr):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_read_idx_round_trip_and_errors(tmp_path):
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", arr)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04\x05")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    raw = gzip.decompress((tmp_path / "a.gz").read_bytes())[:-5]
    (tmp_path / "trunc").write_bytes(raw)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "trunc")


def test_fashion_mnist_from_user_idx_folder(tmp_path):
    d = tmp_path / "fashion_mnist"
    d.mkdir()
    rng = np.random.default_rng(0)
    _write_idx(d / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (6, 28, 28)))
    _write_idx(d / "train-labels-idx1-ubyte.gz", np.arange(6) % 10)
    _write_idx(d / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (4, 28, 28)))
    _write_idx(d / "t10k-labels-idx1-ubyte.gz", np.arange(4))
    s = load_fashion_mnist(root=tmp_path)
    assert s.x_train.shape == (6, 1, 28, 28) and s.x_test.shape == (4, 1, 28, 28) and s.num_classes == 10


def test_fashion_mnist_missing_gives_a_fix(tmp_path, monkeypatch):
    import visionmoe.data.sources as src

    monkeypatch.setattr(src, "_FASHION_DIRS", ("fashion_mnist", str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match="fetch_data.sh"):
        load_fashion_mnist(root=tmp_path)
