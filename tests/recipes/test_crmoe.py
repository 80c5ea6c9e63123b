"""The CR-MoE study runs end to end on tiny real data; `visionmoe probe` evaluates a checkpoint."""

import json

from visionmoe.cli.main import main

TINY = ["data=digits", "eval_tasks=[digits]", "img_size=8",
        "vit={patch_size: 2, embed_dim: 16, depth: 2, num_heads: 2}",
        "num_experts=4", "steps=4", "batch_size=16", "pretrain_limit=128", "probe_train_limit=300",
        "probe_test_limit=100", "episodes=2", "shots=[2]", "semi_fractions=[0.1]", "semi_steps=2",
        "consistency_images=32", "seeds=[0, 1]", "ogar_weight=0.1", "moco={dim: 8, mlp_dim: 16}"]


def test_tiny_crmoe_study_and_probe(tmp_path):
    assert main(["crmoe", "--no-progress", "--out", str(tmp_path), *TINY]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert [(r["variant"], r["seed"]) for r in res["runs"]] == [
        (v, s) for s in (0, 1) for v in ("dense", "vmoe", "vmoe_ogar")]
    for r in res["runs"]:
        assert 0 <= r["linear"]["digits"] <= 1 and 0 <= r["knn"]["digits"] <= 1
        assert set(r["few_shot"]["digits"]) == {"2"} and set(r["semi"]) == {"0.1"}
        assert ("consistency" in r) == (r["variant"] != "dense")
    assert set(res["summary"]) == {"dense", "vmoe", "vmoe_ogar"}
    c = res["summary"]["vmoe_ogar"]["consistency"]["1"]
    assert 0 <= c["matched"]["mean"] <= 2 and 0 <= c["random"]["mean"] <= 2  # top-2: up to 2 shared experts
    report = (tmp_path / "report.md").read_text()
    assert "Routing consistency" in report and (tmp_path / "routing_consistency.png").stat().st_size > 0
    ckpt = next((tmp_path / "vmoe_ogar_seed0" / "checkpoints").glob("*.safetensors"))
    out = tmp_path / "probe"
    assert main(["probe", str(ckpt), "--data", "digits", "--shots", "2", "--episodes", "2", "--train-limit", "200",
                 "--test-limit", "100", "--out", str(out)]) == 0
    probe = json.loads((out / "probe.json").read_text())
    assert 0 <= probe["linear"]["digits"] <= 1 and "consistency" in probe
    from ._checkpoints import every_checkpoint_loads

    every_checkpoint_loads(tmp_path, at_least=6)  # MoCo v3 dense, V-MoE and V-MoE+OGAR of each seed
