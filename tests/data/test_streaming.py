"""Streaming folders, one preprocessing from training to prediction, exact resume with workers."""

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from visionmoe.cli.main import main
from visionmoe.data import Preprocessing, load_dataset, make_photo_folder, open_image, open_image_folder
from visionmoe.data.streaming import StepBatchSampler, eval_set, sample_seed, training_set
from visionmoe.train import Trainer, config_from_dict, load_checkpoint


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory):
    """A user's own folder of 20x20 PNG digits (real MNIST digits, shrunk): train/ and test/."""
    root = tmp_path_factory.mktemp("digits20")
    d = load_dataset("mnist5k")
    rng = np.random.default_rng(0)
    for split, x, y, per in (("train", d.x_train, d.y_train, 40), ("test", d.x_test, d.y_test, 8)):
        for c in range(10):
            (root / split / str(c)).mkdir(parents=True)
            for j, i in enumerate(rng.permutation(np.flatnonzero(y.numpy() == c))[:per]):
                im = Image.fromarray((x[i, 0].numpy() * 255).astype(np.uint8), mode="L")
                im = im.resize((20, 20), Image.BILINEAR)
                im.save(root / split / str(c) / f"{j:03d}.png")
    return root


@pytest.fixture(scope="module")
def small_photos(tmp_path_factory):
    return make_photo_folder(tmp_path_factory.mktemp("photos"), per_class=4, val_per_class=1, min_size=40,
                             max_size=64)


# ------------------------------------------------------------------ preprocessing
def test_preprocessing_squash_crop_and_normalisation_by_hand():
    x = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).reshape(2, 3, 8, 12) / 600  # in [0, 1]
    p = Preprocessing(size=4, channels=3, resize="crop", crop_pct=0.5)  # shorter side 8 -> 8, centre 4x4
    out = p(x)
    assert out.shape == (2, 3, 4, 4)
    assert torch.equal(out, x[:, :, 2:6, 4:8])
    q = Preprocessing(size=8, channels=1, mean=(0.5,), std=(0.25,))
    grey = torch.full((1, 3, 8, 8), 0.75)
    assert torch.allclose(q(grey), torch.full((1, 1, 8, 8), 1.0))  # luma 0.75 -> (0.75 - 0.5) / 0.25
    assert Preprocessing.from_dict(q.to_dict()) == q
    with pytest.raises(ValueError, match="mean/std need 1 values"):
        Preprocessing(size=8, channels=1, mean=(0.5, 0.5, 0.5), std=(1, 1, 1))


def test_sixteen_bit_png_keeps_its_grey_levels(tmp_path):
    arr = (np.linspace(0, 65535, 64).reshape(8, 8)).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "deep.png")
    im = open_image(tmp_path / "deep.png", 1)
    got = np.asarray(im, dtype=np.float64) / 255
    assert len(np.unique(got)) > 32  # not binarised to 0 / 1
    assert np.allclose(got, arr / 65535, atol=1 / 255)


# ------------------------------------------------------------------ order and seeding
def test_step_sampler_shards_partition_each_global_batch():
    full = StepBatchSampler(50, 8, seed=3, start=0, stop=14)
    shards = [list(StepBatchSampler(50, 8, seed=3, start=0, stop=14, rank=r, world=2)) for r in range(2)]
    for step, batch in enumerate(full):
        assert sorted(batch) == sorted(shards[0][step] + shards[1][step])
    epoch0 = [i for b in list(full)[:6] for _, i in b]
    assert epoch0 == torch.randperm(50, generator=torch.Generator().manual_seed(3 * 1_000_003))[:48].tolist()
    assert list(StepBatchSampler(50, 8, seed=3, start=9, stop=14)) == list(full)[9:]
    with pytest.raises(ValueError, match="at least as many training images"):
        StepBatchSampler(4, 8, seed=0, start=0, stop=1)


def test_augmentation_depends_on_seed_epoch_index_only(small_photos):
    data = open_image_folder(small_photos / "train", test_root=small_photos / "val")
    prep = Preprocessing(32, 3)
    ds = training_set(data, prep, seed=1, augment="rrc")
    torch.manual_seed(123)
    a = ds[(2, 5)]
    torch.manual_seed(999)  # the caller's RNG does not matter, and is left as it was
    before = torch.get_rng_state()
    b = ds[(2, 5)]
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert not torch.equal(ds[(3, 5)][0], a[0])  # another epoch, another crop
    assert sample_seed(1, 2, 5) != sample_seed(1, 5, 2)


def test_folder_is_deduplicated_and_train_test_overlap_refused(tmp_path, small_photos):
    src = small_photos / "train" / "chelsea" / "0000.jpg"
    for c in ("a", "b"):
        (tmp_path / "tr" / c).mkdir(parents=True)
        (tmp_path / "tr" / c / "x.jpg").write_bytes(src.read_bytes())
    (tmp_path / "tr" / "a" / "link.jpg").symlink_to(tmp_path / "tr" / "a" / "x.jpg")
    d = open_image_folder(tmp_path / "tr", test_fraction=0.0)
    assert len(d.train) == 2  # the symlink is the same file
    with pytest.raises(ValueError, match="train and test must not share images"):
        open_image_folder(tmp_path / "tr", test_root=tmp_path / "tr")


# ------------------------------------------------------------------ one preprocessing
def _run_cli(*argv) -> str:
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(list(argv)) == 0
    return buf.getvalue()


def test_eval_predict_and_onnx_agree_on_a_folder_of_20px_images(digit_folder, tmp_path):
    """The images (20 px) are not the model's size (16 px): every path resizes them the same way."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    cfg = {"model": {"name": "vit_tiny_patch4_32", "args": {"img_size": 16, "embed_dim": 96, "depth": 2,
                                                            "num_heads": 3}},
           "data": {"name": "image_folder", "args": {"root": str(digit_folder / "train"),
                                                     "test_root": str(digit_folder / "test"), "channels": 1},
                    "augment": "none", "batch_size": 40, "workers": 2},
           "optim": {"lr": 1e-3}, "schedule": {"max_steps": 240, "warmup_epochs": 0.5},
           "run": {"progress": False, "eval_every_epochs": 100, "device": "cpu"}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _run_cli("train", str(path), "--run-dir", str(tmp_path / "run"))
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("step_*.safetensors"))[-1]
    st = load_checkpoint(ckpt)["state"]
    assert st["preprocessing"] == {"size": 16, "channels": 1, "resize": "squash", "crop_pct": 0.875, "mean": None,
                                   "std": None}
    acc_eval = json.loads(_run_cli("eval", str(ckpt), "--device", "cpu"))["test_acc"]
    files = sorted(str(p) for p in (digit_folder / "test").glob("*/*.png"))
    preds = json.loads(_run_cli("predict", str(ckpt), *files, "--json"))
    top1 = [p["top"][0][0] for p in preds]
    truth = [Path(f).parent.name for f in files]
    acc_predict = sum(a == b for a, b in zip(top1, truth)) / len(files)
    assert acc_eval == pytest.approx(acc_predict, abs=1e-12)  # the same to the last image
    assert acc_eval > 0.3  # it learned (chance 0.1)
    out = tmp_path / "m.onnx"
    _run_cli("export", str(ckpt), "-o", str(out))
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    prep = Preprocessing.from_dict(json.loads(meta["visionmoe.preprocessing"]))
    classes = json.loads(meta["visionmoe.classes"])
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.stack([prep.read(f) for f in files]).numpy()
    onnx_top1 = [classes[i] for i in sess.run(None, {"images": x})[0].argmax(-1)]
    assert onnx_top1 == top1


# ------------------------------------------------------------------ exact resume with workers
def _photo_cfg(root: Path, **run) -> dict:
    return {"model": {"name": "vmoe_nano_patch4_32", "args": {"embed_dim": 24, "depth": 2}},
            "moe": {"num_experts": 4, "top_k": 1, "noise_std": 1.0},
            "data": {"name": "image_folder", "args": {"root": str(root / "train"), "test_root": str(root / "val")},
                     "augment": "rrc", "auto_augment": "rand-m9-mstd0.5", "batch_size": 8, "workers": 2},
            "schedule": {"max_steps": 6, "warmup_epochs": 0.3},
            "run": {"progress": False, "eval_every_epochs": 100, "checkpoint_every": 3, "device": "cpu", **run}}


def test_resume_with_two_workers_is_bitwise_equal_to_an_uninterrupted_run(small_photos, tmp_path):
    # a fixed thread count: under run.threads=auto another process's load (e.g. a second test run on
    # the machine) may change the count between the runs, and with it the last bits (a documented limit)
    whole = Trainer(config_from_dict(_photo_cfg(small_photos, threads=2)), run_dir=tmp_path / "whole")
    whole.fit()
    part = Trainer(config_from_dict(_photo_cfg(small_photos, threads=2)), run_dir=tmp_path / "part")
    part.fit(stop_after=3)
    resumed = Trainer(config_from_dict(_photo_cfg(small_photos, threads=2)), run_dir=tmp_path / "part")
    resumed.fit(resume=True)
    assert resumed.step == whole.step == 6
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    oa, ob = whole.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(oa[i]["exp_avg"], ob[i]["exp_avg"]) for i in oa)


def test_workers_do_not_change_the_batches(small_photos, tmp_path):
    t0 = Trainer(config_from_dict({**_photo_cfg(small_photos), "data": {**_photo_cfg(small_photos)["data"],
                                                                         "workers": 0}}), run_dir=tmp_path / "a")
    t2 = Trainer(config_from_dict(_photo_cfg(small_photos)), run_dir=tmp_path / "b")
    from visionmoe.data.streaming import train_loader

    got = [b for b in train_loader(t2.train_set, t2.sampler(0, 3), workers=2, pin_memory=False)]
    for step, batch in enumerate(got):
        ref = t0.batch(step)
        assert torch.equal(batch[0], ref[0]) and torch.equal(batch[1], ref[1])


def test_in_memory_and_folder_share_the_interface(digit_folder):
    folder = open_image_folder(digit_folder / "test", test_fraction=0.5, channels=1)
    prep = Preprocessing(16, 1)
    ds = eval_set(folder, prep)
    x, y = ds[0]
    assert x.shape == (1, 16, 16) and isinstance(y, int)
    mem = load_dataset("digits")
    ms = eval_set(mem, prep)
    assert ms[0][0].shape == (1, 16, 16)
