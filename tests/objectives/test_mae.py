"""MAE: masking, patchify, the objective on dense and MoE encoders, training through the Trainer."""

import pytest
import torch

from visionmoe.data import load_dataset
from visionmoe.models import create_model
from visionmoe.objectives import MAEObjective, patchify, random_masking, unpatchify
from visionmoe.train import Trainer, config_from_dict


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_masking_keeps_exactly_the_requested_number(ratio):
    ids_keep, mask, ids_restore = random_masking(4, 49, ratio, generator=torch.Generator().manual_seed(0))
    keep = int(49 * (1 - ratio))
    assert ids_keep.shape == (4, keep)
    assert (mask.sum(1) == 49 - keep).all()
    for b in range(4):
        assert len(set(ids_keep[b].tolist())) == keep  # distinct patches
        assert (mask[b, ids_keep[b]] == 0).all()  # kept patches are unmasked
        assert torch.equal(ids_restore[b].sort().values, torch.arange(49))  # a permutation
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(1, 4, 1.0)


def test_patchify_round_trip_and_layout():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    p = patchify(x, 2)
    assert p.shape == (2, 4, 4)
    assert p[0, 0].tolist() == [0, 1, 4, 5]  # top-left 2x2 patch, row-major
    assert torch.equal(unpatchify(p, 2, 1, 4, 4), x)
    with pytest.raises(ValueError, match="divisible"):
        patchify(torch.zeros(1, 1, 5, 5), 2)


def test_visible_encoding_matches_full_encoding_when_nothing_is_masked():
    m = create_model("vit_nano_patch4_32", num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32)
    ids_all = torch.arange(64).expand(2, -1)
    torch.testing.assert_close(m.forward_visible(x, ids_all), m.forward_features(x), rtol=1e-5, atol=1e-5)


def test_loss_is_on_masked_patches_only():
    m = create_model("vit_nano_patch4_32", num_classes=0)
    obj = MAEObjective(m, mask_ratio=0.75)
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    out = obj.reconstruct(m, x)
    torch.manual_seed(0)
    loss = obj(m, (x, None))["loss"]
    per = (out["pred"] - out["target"]).pow(2).mean(-1)
    expected = (per * out["mask"]).sum() / out["mask"].sum()
    torch.testing.assert_close(loss, expected)
    # targets are normalised per patch
    torch.testing.assert_close(out["target"].mean(-1), torch.zeros(2, 64), atol=1e-5, rtol=0)


def _mae_cfg(model="vmoe_nano_patch4_32", steps=60):
    return config_from_dict({
        "model": {"name": model, "args": {"img_size": 8, "patch_size": 2, "embed_dim": 48, "depth": 2}},
        "moe": {"num_experts": 4, "top_k": 1, "noise_std": 1.0} if model.startswith("vmoe") else {},
        "objective": "mae", "objective_args": {"mask_ratio": 0.5, "decoder_dim": 32, "decoder_depth": 1},
        "data": {"name": "digits", "augment": "none", "batch_size": 64},
        "optim": {"lr": 0.003, "weight_decay": 0.05},
        "schedule": {"max_steps": steps, "warmup_epochs": 0.3},
        "run": {"progress": False, "log_every": 10, "eval_every_epochs": 100, "checkpoint_every": 1000},
    })


def test_token_moe_mae_trains_and_reconstruction_improves(tmp_path):
    d = load_dataset("digits")
    t = Trainer(_mae_cfg(), run_dir=tmp_path, data=d)
    before = t.evaluate()["test_recon_loss"]
    s = t.fit()
    assert s["test_recon_loss"] < 0.8 * before, (before, s["test_recon_loss"])
    assert set(s["routing"]) == {"blocks.1"}  # TokenMoE layer routed tokens during MAE


def test_mae_resume_restores_decoder(tmp_path):
    d = load_dataset("digits")
    d.x_train, d.y_train = d.x_train[:256], d.y_train[:256]
    full = Trainer(_mae_cfg(steps=8), run_dir=tmp_path / "a", data=d)
    full.fit()
    part = Trainer(_mae_cfg(steps=8), run_dir=tmp_path / "b", data=d)
    part.fit(stop_after=3)
    resumed = Trainer(_mae_cfg(steps=8), run_dir=tmp_path / "b", data=d)
    resumed.fit(resume=True)
    for a, b in zip(full.objective.state_dict().values(), resumed.objective.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
