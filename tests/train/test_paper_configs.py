"""Every full-size config trains a few steps at its real resolution on a generated ImageNet-layout
folder of real JPEGs (streamed, on the CPU, a tiny batch): slow."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visionmoe.data import make_photo_folder
from visionmoe.train import Trainer, load_config

pytestmark = pytest.mark.slow
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CLASSIFICATION = ["paper/vit_s16_imagenet.yaml", "paper/vmoe_s16_imagenet.yaml", "paper/vmoe_b16_last2_imagenet.yaml",
                  "crmoe/vmoe_s16_moco_ogar_imagenet.yaml", "vimoe/dinov2_s14_imagenet_last2.yaml",
                  "vimoe/dinov2_s14_cifar100_last2.yaml"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photo_folder(tmp_path_factory.mktemp("imagenet"), per_class=2, val_per_class=1)


@pytest.fixture(scope="module")
def ade(tmp_path_factory, photos):
    """ADE20K layout: real photos with random-blob label maps (0 = other, 1..150)."""
    root = tmp_path_factory.mktemp("ade")
    rng = np.random.default_rng(0)
    files = sorted(photos.glob("train/*/*.jpg"))
    for split, chosen in (("training", files[:4]), ("validation", files[4:6])):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i, f in enumerate(chosen):
            im = Image.open(f)
            im.save(root / "images" / split / f"ADE_{i:04d}.jpg")
            small = rng.integers(0, 151, size=(8, 8)).astype(np.uint8)
            mask = Image.fromarray(small).resize(im.size, Image.NEAREST)
            mask.save(root / "annotations" / split / f"ADE_{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def dinov2_init(tmp_path_factory):
    """A dense DINOv2 ViT-S/14 checkpoint in timm's layout (random weights: none can be downloaded)."""
    import timm
    from safetensors.torch import save_file

    paths = {}
    for size in (224, 518):
        m = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=size, num_classes=0)
        paths[size] = tmp_path_factory.mktemp("dinov2") / f"dinov2_s14_{size}.safetensors"
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(paths[size]))
    return paths


def _small(cfg_overrides: list[str]) -> list[str]:
    return [*cfg_overrides, "data.batch_size=2", "data.eval_batch_size=4", "data.workers=2", "schedule.max_steps=2",
            "run.progress=false", "run.eval_every_epochs=1000", "run.checkpoint_every=1000", "run.device=cpu",
            "run.threads=2"]


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_full_size_config_trains_from_an_image_folder(name, photos, dinov2_init, tmp_path):
    over = [f"data.args.root={photos / 'train'}"]
    if "test_root" in str(load_config(CONFIGS / name).data.args):
        over.append(f"data.args.test_root={photos / 'val'}")
    cfg = load_config(CONFIGS / name, _small(over))
    if cfg.model.init:
        cfg.model.init = str(dinov2_init[cfg.data.img_size or 224])
    if cfg.objective == "moco":  # the paper's 4096-wide projector is kept; only the batch is tiny
        assert cfg.objective_args["mlp_dim"] == 4096
    t = Trainer(cfg, run_dir=tmp_path)
    size = t.img_size
    assert size == (cfg.data.img_size or 224)
    x = t.batch(0)[0]
    assert x.shape == (2, 3, size, size)
    s = t.fit()
    assert s["finished"] and s["step"] == 2
    assert all(np.isfinite(v) for k, v in s.items() if k.startswith("test_") and isinstance(v, float))
    assert torch.isfinite(torch.tensor(s["train_img_per_s"]))


def test_dinov2_segmentation_config_trains_from_an_ade20k_folder(ade, dinov2_init, tmp_path):
    cfg = load_config(CONFIGS / "vimoe/dinov2_s14_ade20k_seg.yaml", _small([f"data.args.root={ade}"]))
    cfg.model.init = str(dinov2_init[518])
    t = Trainer(cfg, run_dir=tmp_path)
    x, y = t.batch(0)
    assert x.shape == (2, 3, 518, 518) and y.shape == (2, 518, 518)
    assert t.data.num_classes == 150
    s = t.fit()
    assert s["finished"] and "test_miou" in s
