"""The MoCE pipeline runs end to end on tiny real data and writes its report."""

import json

from visionmoe.recipes.moce_demo import MoCEDemoConfig, run_moce_demo


def test_tiny_moce_pipeline_end_to_end(tmp_path):
    cfg = MoCEDemoConfig(sources=["digits", "faces"], per_source=200, img_size=16,
                         vit=dict(patch_size=4, embed_dim=32, depth=3, num_heads=2), mae_steps=15, extra_steps=8,
                         finetune_steps=8, num_clusters=4, num_experts=2, batch_size=32, seeds=[0],
                         finetune_train_limit=200)
    res = run_moce_demo(cfg, out=tmp_path, progress=False)
    assert set(res["tasks"]) == {"digits", "faces"}
    for m in res["tasks"].values():
        assert set(m) == {"MAE*", "TokenMoE", "MoCE"}
        assert all(0.0 <= v["mean"] <= 1.0 for v in m.values())
    run = res["runs"][0]
    assert len(run["blocks"]) == 2 and sum(run["cluster_sizes"]) == 200 + 150  # faces has 150 train images
    assert res["params"]["deployed_dense"] == res["params"]["mae"]  # deployment gives a plain dense ViT
    report = (tmp_path / "report.md").read_text()
    assert "| digits |" in report and "MoCE" in report
    for png in ("mae_loss", "reconstructions", "clusters", "cluster_expert"):
        assert (tmp_path / "seed0" / f"{png}.png").stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["runs"][0]["seed"] == 0
