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


def test_negative_transfer_equal_size_pools(tmp_path):
    args = ["moce-study", "negative-transfer", "--no-progress", "--out", str(tmp_path), *TINY, "seeds=[0]",
            "tasks=[digits]", "per_source=100", "mae_steps=2", "equal_size_pools=true"]
    assert main(args) == 0
    sizes = json.loads((tmp_path / "results.json").read_text())["runs"][0]["pretrain_images"]
    # faces ships 150 training images, so garments+faces has 100 + 100 and every set is cut to the smallest
    assert set(sizes) == {"digits+textures", "garments+faces", "whole pool"}
    assert len(set(sizes.values())) == 1 and sizes["whole pool"] <= 200
    assert "cut to the smallest one" in (tmp_path / "report.md").read_text()


def test_ablation_study(tmp_path):
    from visionmoe.recipes.moce_demo import MoCEDemoConfig
    from visionmoe.recipes.moce_studies import ablation_variants

    args = ["moce-study", "ablations", "--no-progress", "--out", str(tmp_path), *TINY, "seeds=[0]",
            "tasks=[digits, fashion_mnist]", "per_source=60", "mae_steps=4", "extra_steps=2"]
    assert main(args) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    run = res["runs"][0]
    expected = ablation_variants(MoCEDemoConfig())
    assert list(run["variants"]) == list(expected) and "4 experts" not in expected and "16 clusters" not in expected
    assert run["variants"]["first two blocks"]["blocks"] == [0, 1]
    assert run["variants"]["last two blocks"]["blocks"] == [1, 2]  # depth 3
    # every setting transferred to every task, MAE* first; averages are the mean over tasks
    for protocol in ("probe", "finetune"):
        assert list(res["averages"][protocol]) == ["MAE*", *expected]
        for m, a in res["averages"][protocol].items():
            per_task = [run["transfer"][t][m][protocol] for t in ("digits", "fashion_mnist")]
            assert a["mean"] == pytest.approx(sum(per_task) / 2)
    assert run["transfer"]["digits"]["as configured"]["probe"] > 0.3  # 10 classes: beats chance
    # the parameter count grows by one MLP (D*4D + 4D + 4D*D + D) and one gate row (D) per expert per MoE block
    d = 32
    per_expert = d * 4 * d + 4 * d + 4 * d * d + d + d
    params = {m: v["params"] for m, v in run["variants"].items()}
    assert params["8 experts"] - params["1 expert"] == 7 * 2 * per_expert
    report = (tmp_path / "report.md").read_text()
    assert "| no distillation loss |" in report and (tmp_path / "ablations.png").stat().st_size > 0
