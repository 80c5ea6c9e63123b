"""MoCE analyses from the command line on tiny real data: negative transfer and from scratch."""

import json

import pytest

from visionmoe.cli.main import main
from visionmoe.recipes.moce_studies import CLOSER, HALVES

TINY = ["img_size=16", "vit={patch_size: 4, embed_dim: 32, depth: 3, num_heads: 2}", "finetune_steps=4",
        "batch_size=32", "seeds=[0, 1]", "finetune_train_limit=150", "finetune_test_limit=100"]


def test_negative_transfer_study(tmp_path):
    args = ["moce-study", "negative-transfer", "--no-progress", "--out", str(tmp_path), *TINY,
            "tasks=[digits, fashion_mnist]", "per_source=60", "mae_steps=6"]
    assert main(args) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["seed"] for r in res["runs"]] == [0, 1]
    # the halves are disjoint and together make the whole pool, each half with 2 sources of 60 images
    assert not set(HALVES["digits+textures"]) & set(HALVES["garments+faces"])
    assert res["runs"][0]["pretrain_images"] == {"digits+textures": 120, "garments+faces": 120, "whole pool": 240}
    for protocol in ("probe", "finetune"):
        for task, d in res["summary"][protocol].items():
            assert set(d) == {"digits+textures", "garments+faces", "whole pool"}
            vals = [r["transfer"][task]["whole pool"][protocol] for r in res["runs"]]
            assert d["whole pool"]["mean"] == pytest.approx(sum(vals) / 2)
            assert all(0 <= v["mean"] <= 1 for v in d.values())
    report = (tmp_path / "report.md").read_text()
    assert "closer half" in report and f"| digits | {CLOSER['digits']} |" in report
    assert (tmp_path / "negative_transfer_probe.png").stat().st_size > 0


def test_from_scratch_study(tmp_path):
    args = ["moce-study", "from-scratch", "--no-progress", "--out", str(tmp_path), *TINY,
            "sources=[digits, faces]", "tasks=[digits, faces]", "per_source=150", "mae_steps=8", "num_clusters=4",
            "num_experts=2"]
    assert main(args) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    run = res["runs"][0]
    assert run["short_steps"] == 2 and run["blocks"] == [1, 2]  # the last moe_blocks=2 blocks
    assert all(0 <= s["cluster"] < 4 for s in run["selection"].values())
    assert set(res["summary"]["finetune"]["digits"]) == {"MAE (scratch)", "MoCE (scratch)"}
    # the linear probe on digits' frozen features beats chance (10 classes) even after 8 steps
    assert res["summary"]["probe"]["digits"]["MoCE (scratch)"]["mean"] > 0.3
    assert "from random initialisation" in (tmp_path / "report.md").read_text()
