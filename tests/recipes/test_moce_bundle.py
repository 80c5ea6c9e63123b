"""MoCE as a product: `moce pretrain` writes a bundle, `moce deploy` turns it into a dense ViT for a
folder the pre-training never saw, and every other command takes that dense checkpoint."""

import json

import pytest
import torch

from visionmoe.cli.main import main

TINY = ["sources=[faces, fashion_mnist]", "per_source=150", "img_size=16",
        "vit={patch_size: 4, embed_dim: 32, depth: 3, num_heads: 2}", "mae_steps=20", "extra_steps=10",
        "num_clusters=4", "num_experts=2", "batch_size=32"]


def _digits_folder(root, per_class: int = 30):
    """scikit-learn's real digits as an ImageFolder of PNGs (root/<digit>/<i>.png)."""
    from PIL import Image

    from visionmoe.data import load_dataset

    d = load_dataset("digits")
    x = torch.cat([d.x_train, d.x_test])
    y = torch.cat([d.y_train, d.y_test])
    for c in range(10):
        (root / str(c)).mkdir(parents=True)
        for i, j in enumerate((y == c).nonzero().flatten()[:per_class].tolist()):
            Image.fromarray((x[j, 0] * 255).round().byte().numpy(), mode="L").save(root / str(c) / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "b"
    assert main(["moce", "pretrain", "--no-progress", "-o", str(out), *TINY]) == 0
    return out


def test_pretrain_writes_a_bundle_that_loads(bundle):
    from visionmoe.recipes.moce_bundle import load_bundle

    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["pool"] == {"sources": ["faces", "fashion_mnist"], "per_source": 150, "images": 300}
    assert meta["num_clusters"] == 4 and len(meta["blocks"]) == 2 and sum(meta["cluster_sizes"]) == 300
    assert meta["mae_loss"]["last"] > 0 and set(meta["expert_choices"]) == {"0", "1", "2", "3"}
    b = load_bundle(bundle)
    assert b["moce"].is_moe and not getattr(b["encoder"], "is_moe", False)
    assert b["clustering"].centroids.shape == (4, 32)
    assert b["preprocessing"].size == 16 and b["preprocessing"].channels == 1
    for name in ("encoder", "moce"):  # self-describing checkpoints: `info` needs no extra argument
        assert main(["info", str(bundle / f"{name}.safetensors")]) == 0


def test_deploy_train_predict_export_on_a_new_folder(bundle, tmp_path, capsys):
    import timm

    from visionmoe.recipes.moce_bundle import load_bundle
    from visionmoe.train import load_trained_model

    root = _digits_folder(tmp_path / "digits")
    dense = tmp_path / "dense.safetensors"
    assert main(["moce", "deploy", str(bundle), "--data", "image_folder", f"root={root}", "channels=1",
                 "-o", str(dense), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "deployed cluster" in out and "visionmoe train" in out
    rep = json.loads(dense.with_suffix(".json").read_text())
    assert sum(rep["histogram"]) == rep["images"] == 240  # the folder's stratified 80% training split
    assert rep["cluster"] == rep["largest_cluster"] and rep["params"]["dense"] == rep["params"]["encoder"]
    # the deployed model is the MoCE model restricted to the chosen experts
    b = load_bundle(bundle)
    model, _, st = load_trained_model(dense)
    assert st.preprocessing == b["preprocessing"].to_dict() and st.classes == [str(c) for c in range(10)]
    x = torch.rand(8, 1, 16, 16)
    with torch.no_grad():
        want = b["moce"].forward_features(x, routing_key=torch.full((8,), rep["cluster"]))
        assert (model.forward_features(x) - want).abs().max() < 1e-5
    # plain timm keys: timm's own ViT of the same shape takes the weights
    kw = {k: v for k, v in model.init_kwargs.items() if k not in ("moe", "num_classes")}
    timm_vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **kw)
    timm_vit.load_state_dict(model.state_dict(), strict=True)
    assert "dense.safetensors" in dense.with_suffix(".md").read_text()
    # the written config fine-tunes it on the folder; predict and export take the result
    cfg = dense.with_name("dense.train.yaml")
    run = tmp_path / "runs"
    assert main(["train", str(cfg), "schedule.max_steps=6", "data.batch_size=16", f"run.out_dir={run}",
                 "run.name=ft", "run.progress=false"]) == 0
    ck = sorted((run / "ft" / "checkpoints").glob("step_*.safetensors"))[-1]
    png = next((root / "3").glob("*.png"))
    assert main(["predict", str(ck), str(png), "--json"]) == 0
    assert main(["export", str(dense), "-o", str(tmp_path / "dense.onnx")]) == 0
    assert (tmp_path / "dense.onnx").stat().st_size > 0
    # and the evaluation protocols take the deployed encoder as it is
    assert main(["probe", str(dense), "--data", "digits", "--shots", "2", "--episodes", "1", "--train-limit", "100",
                 "--test-limit", "50", "--out", str(tmp_path / "probe")]) == 0
    assert 0 <= json.loads((tmp_path / "probe" / "probe.json").read_text())["linear"]["digits"] <= 1


@pytest.mark.parametrize("select", ["knn", "logme", "early-stop"])
def test_deploy_search_methods_score_every_distinct_choice(bundle, tmp_path, select):
    root = _digits_folder(tmp_path / "digits", per_class=12)
    dense = tmp_path / "d.safetensors"
    assert main(["moce", "deploy", str(bundle), "--data", "image_folder", f"root={root}", "--select", select,
                 "--probe-steps", "3", "-o", str(dense), "--no-progress"]) == 0
    rep = json.loads(dense.with_suffix(".json").read_text())
    assert set(rep["scores"]) == {str(c) for c in rep["candidates"]}
    assert rep["scores"][str(rep["cluster"])] == max(rep["scores"].values())


def test_deploy_refuses_bad_input_clearly(bundle, tmp_path, capsys):
    assert main(["moce", "deploy", str(tmp_path), "--data", "digits", "-o", str(tmp_path / "d.safetensors")]) == 2
    assert "not a MoCE bundle" in capsys.readouterr().err
    assert main(["moce", "deploy", str(bundle), "--data", "image_folder", "DIR"]) == 2
    assert "key=value" in capsys.readouterr().err


@pytest.mark.slow
def test_deployed_model_fine_tunes_better_than_random_init(tmp_path):
    """The product's promise on a folder the pre-training never saw: the quick bundle's deployed
    dense ViT fine-tunes to a higher test accuracy than the same fine-tune from random init."""
    from visionmoe.data import TensorSplits
    from visionmoe.recipes.moce_bundle import read_task_images
    from visionmoe.recipes.moce_pipeline import train_config as _cfg
    from visionmoe.train import Trainer, config_from_dict, load_trained_model

    bundle = tmp_path / "bundle"
    assert main(["moce", "pretrain", "--quick", "--no-progress", "-o", str(bundle),
                 "sources=[fashion_mnist, mnist5k]"]) == 0
    root = _digits_folder(tmp_path / "digits", per_class=100)
    dense = tmp_path / "dense.safetensors"
    assert main(["moce", "deploy", str(bundle), "--data", "image_folder", f"root={root}", "-o", str(dense),
                 "--no-progress"]) == 0
    model, _, st = load_trained_model(dense)
    prep = st.preprocess
    xtr, ytr, classes = read_task_images("image_folder", {"root": str(root), "channels": 1}, prep, limit=None)
    xte, yte, _ = read_task_images("image_folder", {"root": str(root), "channels": 1}, prep, limit=None, split="test")
    task = TensorSplits("digits", xtr, ytr, xte, yte, classes)
    accs = {}
    for name, init in (("deployed", model), ("random", type(model)(**model.init_kwargs))):
        init.reset_classifier(10, global_pool="avg")
        t = Trainer(config_from_dict(_cfg("classification", 300, 64, 3e-3, label_smoothing=0.1)), data=task,
                    model=init, run_dir=tmp_path / name)
        accs[name] = t.fit()["test_acc"]
    print("fine-tuned on the digits folder:", accs)
    assert accs["deployed"] > accs["random"], accs


def test_docs_own_images_commands_run(tmp_path):
    """docs/moce.md "MoCE for your own images": its command lines, as pasted, on a digits folder
    (tiny pre-training sizes and 6 fine-tuning steps appended so that the test stays fast)."""
    import re
    import shlex
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "moce.md").read_text()
    block = re.search(r"<!-- own-images.*?```bash\n(.*?)```", doc, re.S).group(1)
    lines = [ln for ln in block.splitlines() if ln.strip()]
    assert [ln.split()[1] for ln in lines] == ["moce", "moce", "train", "predict"]
    _digits_folder(tmp_path / "my_digits", per_class=12)
    extra = {"pretrain": TINY, "train": ["schedule.max_steps=6", "data.batch_size=16", "run.progress=false"]}
    for ln in lines:
        folder = str(tmp_path / "my_digits")
        ln = ln.replace("root=my_digits", f"root={folder}").replace(" my_digits/", f" {folder}/")
        ln = ln.replace("runs/", f"{tmp_path}/runs/")
        argv = shlex.split(ln)[1:]
        if argv[0] == "predict":
            argv = [a.replace("step_00000500", "step_00000006") for a in argv]
        argv += extra.get(argv[1] if argv[0] == "moce" else argv[0], [])
        assert main(argv + (["--no-progress"] if argv[0] == "moce" else [])) == 0, ln
    assert (tmp_path / "runs" / "my_digits" / "dense.md").is_file()


def test_pretrain_on_the_users_own_unlabelled_folder(tmp_path):
    root = _digits_folder(tmp_path / "pool", per_class=20)  # 200 images; their labels are ignored
    out = tmp_path / "b"
    assert main(["moce", "pretrain", "--no-progress", "--pool-root", str(root), "-o", str(out), *TINY,
                 "per_source=60"]) == 0  # at most 60 x 2 sources = 120 images
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["pool"] == {"folder": str(root), "images": 120}
    assert sum(meta["cluster_sizes"]) == 120 - 12  # a tenth held out for the reconstruction test loss
