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
        assert cfg.moe["aux_weights"] == {"gshard": 0.01} and cfg.optim.layer_decay == 0.65
        assert cfg.model.init == "x.safetensors"
    seg = config_from_dict(segmentation_config(c, "moe_token", 0, "x.safetensors"))
    assert seg.objective == "segmentation" and seg.moe["routing"] == "token" and seg.moe["shared_expert"]
    assert seg.moe["aux_weights"] == {"gshard": 0.001}
    assert config_from_dict(stability_config(c, "dense", 0, "x")).moe == {}
    with pytest.raises(ValueError, match="parts"):
        ViMoEStudyConfig(parts=["segmentaton"])


def test_toy_study_writes_tables_and_figures(tmp_path):
    c = ViMoEStudyConfig.from_overrides(["pretrain_limit=300", "stability_epochs=0.3", "seg_epochs=0.5",
                                         "seg_data=digit_scenes"], quick=True)
    res = run_vimoe_study(c, out=tmp_path, progress=False)
    assert {r["variant"] for r in res["stability"]} == {"dense", "moe_noshared", "moe_shared"}
    assert {r["variant"] for r in res["segmentation"]} == {"dense", "moe_token"}
    for r in res["segmentation"]:
        assert 0 <= r["miou"] <= 1 and 0 <= r["pixel_acc"] <= 1 and len(r["iou"]) == 11
    report = (tmp_path / "report.md").read_text()
    assert "| moe_shared |" in report and "| moe_token |" in report and "mIoU" in report
    for png in ("stability_curves.png", "seg_masks_dense.png", "seg_masks_moe_token.png",
                "seg_routing_moe_token.png"):
        assert (tmp_path / png).stat().st_size > 0, png
    assert json.loads((tmp_path / "results.json").read_text())["summary"]["segmentation"]["dense"]["n"] == 1
    from ._checkpoints import every_checkpoint_loads

    # the pre-trained dense ViT, the stability and segmentation models: all self-describing
    every_checkpoint_loads(tmp_path, at_least=6, predict=lambda ck, m: "stability" in str(ck))


def test_cli_refuses_unknown_settings(capsys):
    assert main(["vimoe", "--quick", "seg_epoch=3"]) == 2
    assert "seg_epoch" in capsys.readouterr().err
