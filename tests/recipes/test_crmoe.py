"""The CR-MoE study runs end to end on tiny real data; `visionmoe probe` evaluates a checkpoint."""

import json

import pytest

from visionmoe.cli.main import main

TINY = ["data=digits", "eval_tasks=[digits]", "img_size=8",
        "vit={patch_size: 2, embed_dim: 16, depth: 2, num_heads: 2}",
        "num_experts=4", "steps=4", "batch_size=16", "pretrain_limit=128", "probe_train_limit=300",
        "probe_test_limit=100", "episodes=2", "shots=[2]", "semi_linear_fractions=[0.1]",
        "semi_finetune_fractions=[0.1]", "semi_steps=2", "semi_lrs=[1e-3, 3e-3]",
        "consistency_images=32", "seeds=[0, 1]", "ogar_weight=0.1", "moco={dim: 8, mlp_dim: 16}"]


def test_tiny_crmoe_study_and_probe(tmp_path):
    assert main(["crmoe", "--no-progress", "--out", str(tmp_path), *TINY]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert [(r["variant"], r["seed"]) for r in res["runs"]] == [
        (v, s) for s in (0, 1) for v in ("random init", "dense", "vmoe", "vmoe_ogar")]
    for r in res["runs"]:
        assert 0 <= r["linear"]["digits"] <= 1 and 0 <= r["knn"]["digits"] <= 1
        assert set(r["few_shot"]["digits"]) == {"2"} and set(r["semi"]) == {"linear 0.1", "finetune 0.1"}
        ft = r["semi"]["finetune 0.1"]
        assert ft["lr"] in (1e-3, 3e-3) and set(ft["val_acc"]) == {"0.001", "0.003"}
        assert ft["protocol"] == ("fine-tune from a linear head" if r["variant"] == "random init"
                                  else "fine-tune from the first MLP-head layer")
        assert ("consistency" in r) == (r["variant"] in ("vmoe", "vmoe_ogar"))
        assert ("loss_curve" in r) == (r["variant"] != "random init")
    assert set(res["summary"]) == {"random init", "dense", "vmoe", "vmoe_ogar"}
    assert 0 <= res["pixels"]["linear"]["digits"] <= 1 and "linear 0.1" in res["pixels"]["semi"]
    # the paired claims, one difference per seed pair, recomputed here by hand
    d = res["paired"]["vmoe_ogar - vmoe"]["linear/digits"]
    by = {(r["variant"], r["seed"]): r["linear"]["digits"] for r in res["runs"]}
    assert d["n"] == 2 and d["mean"] == pytest.approx(
        sum(by[("vmoe_ogar", s)] - by[("vmoe", s)] for s in (0, 1)) / 2)
    c = res["summary"]["vmoe_ogar"]["consistency"]["1"]
    assert 0 <= c["matched"]["mean"] <= 2 and 0 <= c["random"]["mean"] <= 2  # top-2: up to 2 shared experts
    report = (tmp_path / "report.md").read_text()
    assert "Routing consistency" in report and (tmp_path / "routing_consistency.png").stat().st_size > 0
    ckpt = next((tmp_path / "vmoe_ogar_seed0" / "checkpoints").glob("*.safetensors"))
    out = tmp_path / "probe"
    assert main(["probe", str(ckpt), "--data", "digits", "--shots", "2", "--episodes", "2", "--train-limit", "200",
                 "--test-limit", "100", "--semi-finetune", "0.2", "--semi-steps", "2", "--semi-lrs", "1e-3",
                 "--out", str(out)]) == 0
    probe = json.loads((out / "probe.json").read_text())
    assert 0 <= probe["linear"]["digits"] <= 1 and "consistency" in probe
    assert probe["semi"]["finetune 0.2"]["protocol"] == "fine-tune from the first MLP-head layer"  # from the file
    from ._checkpoints import every_checkpoint_loads

    every_checkpoint_loads(tmp_path, at_least=6)  # MoCo v3 dense, V-MoE and V-MoE+OGAR of each seed


def test_crmoe_study_resumes_with_more_seeds_and_refuses_other_settings(tmp_path, capsys):
    base = [*[a for a in TINY if not a.startswith("seeds=")], "variants=[dense]"]
    assert main(["crmoe", "--no-progress", "--out", str(tmp_path), *base, "seeds=[0]"]) == 0
    first = json.loads((tmp_path / "results.json").read_text())["runs"]
    (tmp_path / "dense_seed0").rename(tmp_path / "moved")  # a kept run is not trained again
    assert main(["crmoe", "--no-progress", "--resume", "--out", str(tmp_path), *base, "seeds=[0,1]"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert [(r["variant"], r["seed"]) for r in res["runs"]] == [("random init", 0), ("dense", 0), ("random init", 1),
                                                                  ("dense", 1)]
    assert res["runs"][:2] == first and not (tmp_path / "dense_seed0").exists()
    assert res["summary"]["dense"]["linear"]["digits"]["n"] == 2
    capsys.readouterr()
    assert main(["crmoe", "--no-progress", "--resume", "--out", str(tmp_path), *base, "seeds=[0,1]", "steps=5"]) == 2
    err = capsys.readouterr().err
    assert "steps: 4 -> 5" in err and "--resume" in err and len(err.strip().splitlines()) == 1
    assert json.loads((tmp_path / "results.json").read_text()) == res  # nothing lost
