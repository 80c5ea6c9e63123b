"""The ViMoE study end to end at toy size: pre-train, upcycle, stability and segmentation runs."""

import json

import pytest

from visionmoe.cli.main import main
from visionmoe.recipes.vimoe import ViMoEStudyConfig, run_vimoe_study, segmentation_config, stability_config
from visionmoe.train import config_from_dict


def test_configs_validate_and_follow_the_paper_settings():
    c = ViMoEStudyConfig()
    for v, shared in (("moe_noshared", False), ("moe_shared", True)):
        cfg = config_from_dict(stability_config(c, v, 0, "x.safetensors"))
        assert cfg.moe["placement"] == "all" and cfg.moe["routing"] == "cls" and cfg.moe["shared_expert"] is shared
        # the fine-tune chosen on a validation split: 10 epochs, no layer decay
        assert cfg.moe["aux_weights"] == {"gshard": 0.01} and cfg.optim.layer_decay is None
        assert cfg.schedule.epochs == 10 and cfg.model.init == "x.safetensors"
    seg = config_from_dict(segmentation_config(c, "moe_token", 0, "x.safetensors"))
    assert seg.objective == "segmentation" and seg.moe["routing"] == "token" and seg.moe["shared_expert"]
    assert seg.moe["aux_weights"] == {"gshard": 0.001} and seg.optim.layer_decay == 0.65
    assert config_from_dict(stability_config(c, "dense", 0, "x")).moe == {}
    # the baseline: the same fine-tune of the dense ViT from random initialisation (no layer decay)
    for build in (stability_config, segmentation_config):
        scratch, dense = (config_from_dict(build(c, v, 3, "x.safetensors")) for v in ("scratch", "dense"))
        assert scratch.model.init is None and scratch.moe == {} and scratch.optim.layer_decay is None
        assert scratch.model.name == dense.model.name and scratch.schedule == dense.schedule
        assert scratch.optim.lr == dense.optim.lr and scratch.data == dense.data and scratch.run.seed == 3
    with pytest.raises(ValueError, match="parts"):
        ViMoEStudyConfig(parts=["segmentaton"])


def test_toy_study_writes_tables_and_figures(tmp_path):
    c = ViMoEStudyConfig.from_overrides(["pretrain_limit=300", "stability_epochs=0.3", "seg_epochs=0.5",
                                         "seg_data=digit_scenes"], quick=True)
    res = run_vimoe_study(c, out=tmp_path, progress=False)
    assert {r["variant"] for r in res["stability"]} == {"dense", "moe_noshared", "moe_shared", "scratch"}
    assert {r["variant"] for r in res["segmentation"]} == {"dense", "moe_token", "scratch"}
    assert 0.1 < res["pixel_probe"] <= 1
    for r in res["segmentation"]:
        assert 0 <= r["miou"] <= 1 and 0 <= r["pixel_acc"] <= 1 and len(r["iou"]) == 11
    report = (tmp_path / "report.md").read_text()
    assert "moe_shared" in report and "moe_token" in report and "mIoU" in report and "raw-pixel" in report
    for png in ("stability_curves.png", "seg_masks_dense.png", "seg_masks_moe_token.png",
                "seg_routing_moe_token.png"):
        assert (tmp_path / png).stat().st_size > 0, png
    assert json.loads((tmp_path / "results.json").read_text())["summary"]["segmentation"]["dense"]["n"] == 1
    from ._checkpoints import every_checkpoint_loads

    # the pre-trained dense ViT, the stability and segmentation models: all self-describing
    every_checkpoint_loads(tmp_path, at_least=6, predict=lambda ck, m: "stability" in str(ck))


def test_report_pairs_seeds_and_flags_encoders_below_their_baselines(tmp_path):
    from visionmoe.recipes import vimoe

    accs = {"dense": [0.80, 0.82, 0.81], "moe_noshared": [0.90, 0.91, 0.92], "moe_shared": [0.92, 0.94, 0.945],
            "scratch": [0.85, 0.86, 0.87]}
    res = {"config": {**vimoe.asdict(ViMoEStudyConfig(seeds=[0, 1, 2])), "pretrained": None},
           "pretrain": {"test_acc": 0.87}, "pixel_probe": 0.905, "segmentation": [],
           "stability": [{"variant": v, "seed": s, "test_acc": a, "curve": [(1.0, a)], "loss_std_last_half": 0.1}
                         for v, xs in accs.items() for s, a in enumerate(xs)]}
    vimoe._aggregate(res)
    paired = res["summary"]["stability_paired"]
    # with - without the shared expert: d = 0.02, 0.03, 0.025; mean 0.025, sd 0.005, t(0.975, 2) = 4.3027
    d = paired["with - without the shared expert (the paper: with is better)"]
    assert d["mean"] == pytest.approx(0.025) and d["verdict"] == "reproduced"
    assert d["ci"] == pytest.approx([0.025 - 4.3027 * 0.005 / 3**0.5, 0.025 + 4.3027 * 0.005 / 3**0.5], abs=1e-4)
    assert paired["pre-trained dense - random init"]["verdict"] == "refuted"  # d = -0.05, -0.04, -0.06
    # dense loses to random init and to the pixels; moe_noshared (0.91) beats both
    assert res["summary"]["flagged"]["stability"] == ["dense", "scratch"]
    assert any("dense (0.8100) does not beat" in w for w in res["summary"]["warnings"])
    vimoe._report(tmp_path, res)
    report = (tmp_path / "report.md").read_text()
    assert "**Warning:**" in report and "| **dense** |" in report and "| moe_noshared |" in report
    assert "raw-pixel linear probe 0.9050" in report and ": reproduced" in report and ": refuted" in report


def test_cli_refuses_unknown_settings(capsys):
    assert main(["vimoe", "--quick", "seg_epoch=3"]) == 2
    assert "seg_epoch" in capsys.readouterr().err
