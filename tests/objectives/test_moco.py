"""MoCo v3 + OGAR: crop geometry, IoU matching, the OGAR loss by hand, momentum, a training run."""

import math

import pytest
import torch
import torch.nn.functional as F

from visionmoe.objectives.moco import (
    MoCoObjective,
    TwoViewAugment,
    crop_with_geometry,
    gate_infonce,
    match_patches,
    moco_momentum,
    ogar_loss,
    patch_boxes,
)


@pytest.mark.parametrize("flip", [False, True])
def test_patch_boxes_land_on_the_right_source_pixels(flip):
    src = torch.arange(16 * 16, dtype=torch.float32).reshape(1, 16, 16)
    view, geom = crop_with_geometry(src, top=4, left=2, height=8, width=8, size=8, flip=flip)  # no resampling
    assert geom.tolist() == [2 / 16, 4 / 16, 8 / 16, 8 / 16, float(flip)]
    boxes = patch_boxes(geom[None], grid=2)[0]  # 4 patches of 4x4 pixels
    for n, (x0, y0, x1, y1) in enumerate((boxes * 16).round().long().tolist()):
        r, c = divmod(n, 2)
        patch = view[:, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4]
        region = src[:, y0:y1, x0:x1]
        torch.testing.assert_close(patch, region.flip(-1) if flip else region)


def test_match_patches_hand_case():
    b1 = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]])
    b2 = torch.tensor([[[0.25, 0.25, 0.75, 0.75], [0.0, 0.0, 0.4, 0.5], [0.9, 0.9, 1.0, 1.0]]])
    idx, valid = match_patches(b1, b2, threshold=0.2)
    # patch 0: IoU 1/7 with box 0, 0.8 with box 1; patch 1: IoU 1/7 with box 0, 0.04 with box 2
    assert idx.tolist() == [[1, 0]] and valid.tolist() == [[True, False]]


def _hand_infonce(p, q, t):
    """-log softmax of the matching row, by explicit loops."""
    total = 0.0
    for i in range(len(p)):
        sims = [float(F.cosine_similarity(p[i], q[j], dim=0)) / t for j in range(len(q))]
        total += -(sims[i] - math.log(sum(math.exp(s) for s in sims)))
    return total / len(p) * 2 * t


def test_ogar_loss_equals_hand_computation():
    g = torch.Generator().manual_seed(0)
    t, alpha = 0.2, 0.3
    cls1, cls2 = torch.rand(3, 4, generator=g).softmax(-1), torch.rand(3, 4, generator=g).softmax(-1)
    p1, p2 = torch.rand(3, 2, 4, generator=g).softmax(-1), torch.rand(3, 2, 4, generator=g).softmax(-1)
    idx12 = torch.tensor([[1, 0], [0, 0], [1, 1]])
    val12 = torch.tensor([[True, False], [True, True], [False, False]])
    idx21 = torch.tensor([[0, 0], [1, 0], [0, 1]])
    val21 = torch.tensor([[True, True], [False, False], [False, True]])
    out = ogar_loss(cls1, cls2, p1, p2, idx12, val12, idx21, val21, alpha=alpha, temperature=t)
    cls = _hand_infonce(cls1, cls2, t) + _hand_infonce(cls2, cls1, t)

    def patch_dir(a, b, idx, val):
        terms = []
        for i in range(3):
            for n in range(2):
                if val[i, n]:
                    cands = b[:, idx[i, n]]  # the matched position in every image
                    sims = [float(F.cosine_similarity(a[i, n], cands[j], dim=0)) / t for j in range(3)]
                    terms.append(-(sims[i] - math.log(sum(math.exp(s) for s in sims))))
        return sum(terms) / val.numel() * 2 * t  # eq. 8: averaged over all patches, unmatched ones count 0

    patch = patch_dir(p1, p2, idx12, val12) + patch_dir(p2, p1, idx21, val21)
    assert float(out["cls"]) == pytest.approx(cls, rel=1e-5)
    assert float(out["patch"]) == pytest.approx(patch, rel=1e-5)
    assert float(out["loss"]) == pytest.approx((1 - alpha) * cls + alpha * patch, rel=1e-5)
    # identical gates for both views give a lower loss than shuffled ones
    assert gate_infonce(cls1, cls1, t) < gate_infonce(cls1, cls2[[2, 0, 1]], t)


def test_momentum_schedule_and_update():
    assert moco_momentum(0, 100) == pytest.approx(0.99)
    assert moco_momentum(50, 100) == pytest.approx(0.995)
    assert moco_momentum(100, 100) == pytest.approx(1.0)
    from visionmoe.models import VisionTransformer

    model = VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2,
                              num_classes=0)
    obj = MoCoObjective(model, dim=8, mlp_dim=16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = [p.clone() for p in obj.momentum_encoder.parameters()]
    obj.update_momentum(model, 0.9)
    for pk, old, q in zip(obj.momentum_encoder.parameters(), before, model.parameters()):
        torch.testing.assert_close(pk, 0.9 * old + 0.1 * q)
    assert not any(p.requires_grad for p in obj.momentum_encoder.parameters())


def test_two_view_augment_geometry_is_valid():
    torch.manual_seed(0)
    aug = TwoViewAugment(16)
    v1, g1, v2, g2 = aug(torch.rand(5, 3, 24, 24))
    assert v1.shape == v2.shape == (5, 3, 16, 16)
    for g in (g1, g2):
        assert (g[:, :4] >= 0).all() and (g[:, 0] + g[:, 2] <= 1 + 1e-6).all() and (g[:, 1] + g[:, 3] <= 1 + 1e-6).all()
        assert set(g[:, 4].tolist()) <= {0.0, 1.0}


def test_moco_with_ogar_trains_a_vmoe(tmp_path):
    from visionmoe.data import load_dataset
    from visionmoe.train import Trainer, config_from_dict

    d = load_dataset("digits")
    cfg = config_from_dict({
        "model": {"name": "vmoe_nano_patch4_32",
                  "args": {"img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 0}},
        "moe": {"num_experts": 4, "top_k": 2, "noise_std": 0.0},
        "data": {"name": "digits", "augment": "none", "batch_size": 32},
        "objective": "moco",
        "objective_args": {"dim": 16, "mlp_dim": 32, "ogar_weight": 1.0, "augment": {"scale": [0.3, 1.0]}},
        "schedule": {"max_steps": 4, "warmup_epochs": 0},
        "run": {"progress": False, "log_every": 1, "checkpoint_every": 100},
    })
    t = Trainer(cfg, data=d, run_dir=tmp_path)
    start = [p.clone() for p in t.objective.momentum_encoder.parameters()]
    summary = t.fit()
    assert math.isfinite(summary["test_ctr_loss"])
    assert int(t.objective.step) == 4
    assert any(not torch.equal(a, b) for a, b in zip(start, t.objective.momentum_encoder.parameters()))
    rows = [r for r in map(__import__("json").loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
            if "ogar_loss" in r]
    assert rows and all(r["ogar_loss"] > 0 and r["ogar_patch"] > 0 for r in rows)
    # OGAR alone sends a gradient into the routers
    obj, model = t.objective, t.model
    model.zero_grad()
    x = d.x_train[:16]
    v1, g1, v2, g2 = obj.views(x)
    _, gates1 = obj._embed(model, v1)
    _, gates2 = obj._embed(model, v2)
    obj.ogar(gates1, gates2, g1, g2)["loss"].backward()
    grads = [p.grad for n, p in model.named_parameters() if ".router." in n]
    assert grads and all(gr is not None and gr.abs().sum() > 0 for gr in grads)
