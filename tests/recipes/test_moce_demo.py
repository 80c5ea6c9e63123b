"""The MoCE demo runs end to end from the command line on tiny real data and writes its report."""

import json

import pytest

from visionmoe.cli.main import main

TINY = ["sources=[digits, faces]", "tasks=[digits, faces, mnist5k]", "per_source=200", "img_size=16",
        "vit={patch_size: 4, embed_dim: 32, depth: 3, num_heads: 2}", "mae_steps=15", "extra_steps=8",
        "finetune_steps=8", "num_clusters=4", "num_experts=2", "batch_size=32", "seeds=[0]",
        "finetune_train_limit=200", "finetune_test_limit=100", "compare_selection=true", "selection_probe_steps=3",
        "finetune_lrs=[0.01, 0.1]", "sdr=true"]


def test_tiny_moce_demo_end_to_end(tmp_path):
    assert main(["demo", "--no-progress", "--out", str(tmp_path), *TINY]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["tasks"]) == {"digits", "faces", "mnist5k"}  # mnist5k: a task the pre-training never saw
    for m in res["tasks"].values():
        assert set(m) == {"MAE*", "TokenMoE", "MoCE", "SDR"}
        assert all(0.0 <= v["mean"] <= 1.0 for v in m.values())
    run = res["runs"][0]
    assert len(run["blocks"]) == 2 and sum(run["cluster_sizes"]) == 200 + 150  # faces has 150 train images
    assert res["params"]["deployed_dense"] == res["params"]["mae"]  # deployment gives a plain dense ViT
    assert res["params"]["moce_total"] > res["params"]["mae"]
    assert set(res["speed"]) >= {"deployed dense ViT", "MoCE (all experts)"}
    # the lr search picked one of the candidates for every task and method
    assert all(v["chosen"] in (0.01, 0.1) for d in res["lr"].values() for v in d.values())
    sel = run["selection_methods"]
    for task in res["tasks"]:
        d = sel[task]
        assert d["exhaustive_worst"] <= d["picked"]["k-NN"]["test_acc"] <= d["exhaustive_best"]
        assert set(d["picked"]) == {"largest cluster (MoCE)", "k-NN", "LogME", "early-stop search"}
    for task, d in run["sdr_search"].items():  # SDR's brute force picked its best subnet on validation
        assert d["val_acc"][str(d["picked"])] == max(d["val_acc"].values()) and d["seconds"] > 0
        assert all(s > 0 for s in sel[task]["seconds"].values())
    assert set(run["recon"]) == {"MAE*", "TokenMoE", "MoCE", "SDR"}
    # baselines on the same images, and the paired comparisons a reader checks the claims with
    for task, b in res["baselines"].items():
        assert set(b) == {"pixel probe", "random init"} and all(0 <= v["mean"] <= 1 for v in b.values())
        assert set(res["paired"][task]) >= {"MoCE - MAE*", "MoCE - TokenMoE", "MoCE - random init"}
        d = res["paired"][task]["MoCE - random init"]
        assert d["mean"] == pytest.approx(res["tasks"][task]["MoCE"]["mean"] - b["random init"]["mean"])
        assert d["ci"] is None and d["verdict"] == "not resolved (1 seed)"  # one seed: no interval, no claim
    from visionmoe.recipes.moce_demo import pixel_probe  # noqa: F401 - the public baseline
    report = (tmp_path / "report.md").read_text()
    assert "baseline: random init" in report and "Seed-paired differences" in report
    assert "± 0.0000" not in report  # one seed: no std printed
    assert "| digits |" in report and "Expert selection methods" in report and "images/s" in report
    assert "SDR(ViT): brute-force subnet search" in report and "| exhaustive |" in report
    assert all(5 < v < 60 for d in run["psnr"].values() for v in d.values())  # dB, finite and plausible
    assert run["recon_task"].keys() == run["psnr"].keys()
    assert all(0 < v < 10 for d in run["recon_task"].values() for v in d.values())  # normalised-space MSE
    assert all(0 < v <= 1 for d in run["collapse"].values() for v in d.values())
    # finetune_augment: auto (the default): each task's fine-tunes, baseline included, augment as its table says
    import yaml

    for task, kind in (("digits", "shift"), ("mnist5k", "shift"), ("faces", "shift")):  # faces: not in the table
        for tag in ("random", "mae", "moce"):
            cfg = yaml.safe_load((tmp_path / "seed0" / f"ft_{tag}_{task}" / "config.yaml").read_text())
            assert cfg["data"]["augment"] == kind, (task, tag)
    assert "augmentation per task: digits shift" in report
    for png in ("mae_loss", "reconstructions", "clusters", "cluster_expert", "routing"):
        assert (tmp_path / "seed0" / f"{png}.png").stat().st_size > 0
    _every_checkpoint_loads(tmp_path)


def _every_checkpoint_loads(root):
    """Each checkpoint the demo writes describes the model it holds (a model spec): `info` and
    `load_trained_model` rebuild exactly that model, and `predict` runs on the dense fine-tuned
    ones; the MoCE model gives the dense ViT of a cluster's experts."""
    from ._checkpoints import every_checkpoint_loads

    for ck, model, st in every_checkpoint_loads(root, at_least=20, predict=lambda ck, m: ck.parent.parent.name
                                                .startswith("ft_") and not getattr(m, "is_moe", False)):
        assert st.model_spec is not None, ck
        if ck.parent.parent.name == "moce":  # the MoCE model: the dense ViT of cluster 0's experts
            dense = model.extract_dense(key=0)
            assert not dense.is_moe and sum(p.numel() for p in dense.parameters()) < sum(
                p.numel() for p in model.parameters())


def test_task_augment_keeps_labels_per_task():
    from visionmoe.recipes.moce_pipeline import TASK_AUGMENT, task_augment

    assert task_augment("auto", "mnist5k") == "shift" and task_augment("auto", "digits") == "shift"  # no mirrors
    assert task_augment("auto", "fashion_mnist") == "flip"  # a mirrored shirt is a shirt
    assert task_augment("auto", "someone's folder") == "shift"  # unknown data: the label-safe choice
    assert task_augment("none", "fashion_mnist") == "none" and task_augment("basic", "mnist5k") == "basic"
    assert all(k != "basic" for t, k in TASK_AUGMENT.items() if "mnist" in t and "fashion" not in t)


def test_demo_setting_errors_are_clear(capsys, tmp_path):
    assert main(["demo", "--out", str(tmp_path), "num_expert=8"]) == 2
    assert "Did you mean 'num_experts'" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "finetune_augment=shfit"]) == 2  # refused before any training
    err = capsys.readouterr().err
    assert "finetune_augment='shfit'" in err and "auto" in err and "Traceback" not in err
