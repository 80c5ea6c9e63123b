"""ONNX export (dense, MoE with routing, dense extracted from experts) and prediction."""

import numpy as np
import pytest
import torch

from visionmoe import create_model
from visionmoe.cli.main import main
from visionmoe.data import load_dataset, read_image
from visionmoe.export import check_onnx, export_onnx, predict_images, static_moe
from visionmoe.moe.layer import moe_layers
from visionmoe.train import Trainer, config_from_dict

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SMALL = {"img_size": 8, "patch_size": 2, "embed_dim": 24, "depth": 2, "num_heads": 2, "num_classes": 10,
         "in_chans": 1}


def _moe(**moe):
    return create_model("vmoe_nano_patch4_32", **SMALL,
                        moe={"num_experts": 4, "top_k": 2, "placement": "all", **moe}).eval()


@pytest.mark.parametrize("moe", [{}, {"router": "cosine"}, {"routing": "cls", "top_k": 1},
                                 {"shared_expert": True, "top_k": 1}])
def test_static_path_equals_dropless_dispatch(moe):
    m = _moe(**moe)
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        ref = m(x)
        with static_moe(m):
            got = m(x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("moe", [{"eval_capacity_factor": 0.5},
                                 {"routing": "cls", "top_k": 1, "eval_capacity_factor": 1.0},
                                 {"selection": "expert_choice"},
                                 {"shared_expert": True, "top_k": 1, "eval_capacity_factor": 0.7, "bpr": False}])
def test_sparse_static_path_equals_eval_with_its_capacity(moe):
    m = _moe(**moe)
    x = torch.rand(9, 1, 8, 8)
    with torch.no_grad():
        ref = m(x)
        with static_moe(m, "sparse"):
            got = m(x)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    if moe.get("eval_capacity_factor", 1) < 1:  # the capacity drops something: dropless differs
        with torch.no_grad(), static_moe(m, "dense"):
            assert (m(x) - ref).abs().max() > 1e-4


def test_moe_exports_with_routing_and_matches_in_onnxruntime(tmp_path):
    m = _moe(eval_capacity_factor=0.5)  # the routed export keeps the eval capacity (it drops here)
    res = export_onnx(m, tmp_path / "moe.onnx")
    assert res["kind"] == "moe" and res["experts"] == "sparse" and res["max_abs_diff"] <= 1e-5
    assert res["input_shape"] == [1, 8, 8]
    sess = ort.InferenceSession(str(tmp_path / "moe.onnx"))
    for b in (1, 7, 13):  # dynamic batch; the capacity is computed from the batch in the graph
        x = np.random.default_rng(b).random((b, 1, 8, 8), dtype=np.float32)
        out = sess.run(None, {"images": x})[0]
        with torch.no_grad():
            ref = m(torch.from_numpy(x)).numpy()
        assert out.shape == (b, 10) and np.abs(out - ref).max() <= 1e-5
    # the fallback: every expert on every token, dropless
    res = export_onnx(m, tmp_path / "dense.onnx", experts="dense", dynamo=False)
    assert res["experts"] == "dense" and res["max_abs_diff"] <= 1e-4
    with pytest.raises(ValueError, match="experts must be one of"):
        export_onnx(m, tmp_path / "x.onnx", experts="all")
    # the capacity setting is restored after export
    assert all(layer.dispatcher.eval_capacity_factor == 0.5 for _, layer in moe_layers(m))
    assert all(layer.static is False for _, layer in moe_layers(m))


def test_dense_and_dense_from_experts_export(tmp_path):
    dense = create_model("vit_nano_patch4_32", **SMALL).eval()
    assert export_onnx(dense, tmp_path / "d.onnx", dynamo=False)["kind"] == "dense"
    moce = create_model("moce_tiny_patch4_32", **SMALL, moe={"num_experts": 4, "num_keys": 3}).eval()
    with pytest.raises(ValueError, match="cluster/task id.*key=ID"):
        export_onnx(moce, tmp_path / "m.onnx", dynamo=False)
    res = export_onnx(moce, tmp_path / "m.onnx", key=2, dynamo=False)
    assert res["kind"] == "dense-from-experts"
    # the ONNX dense model computes what the MoCE model computes for cluster 2
    x = torch.rand(3, 1, 8, 8)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"))
    got = torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])
    with torch.no_grad():
        ref = moce(x, routing_key=torch.full((3,), 2))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_check_onnx_catches_a_different_model(tmp_path):
    a, b = _moe(), _moe()
    export_onnx(a, tmp_path / "a.onnx", check=False, dynamo=False)
    with pytest.raises(ValueError, match="differ by"):
        check_onnx(b, tmp_path / "a.onnx", (1, 8, 8))


def test_predict_images_top_k_and_routing():
    m = _moe(routing="cls", top_k=1)
    x = torch.rand(3, 1, 8, 8)
    preds = predict_images(m, x, [f"c{i}" for i in range(10)], top=5, routing=True)
    assert len(preds) == 3
    with torch.no_grad():
        probs = m(x).softmax(-1)
    for p, row in zip(preds, probs):
        assert [c for c, _ in p["top"]] == [f"c{int(i)}" for i in row.topk(5).indices]
        assert p["top"][0][1] == pytest.approx(float(row.max()), abs=1e-4)
        # image-level routing: one expert per layer takes the whole image
        assert set(p["experts"]) == {"blocks.0.mlp", "blocks.1.mlp"}
        assert all(len(v) == 1 and v[0][1] == 1.0 for v in p["experts"].values())


def test_cli_export_and_predict(tmp_path, capsys):
    from PIL import Image

    cfg = config_from_dict({
        "model": {"name": "vmoe_nano_patch4_32", "args": {k: v for k, v in SMALL.items()
                                                          if k not in ("num_classes", "in_chans")}},
        "moe": {"num_experts": 4, "top_k": 1}, "data": {"name": "digits", "batch_size": 64, "augment": "none"},
        "schedule": {"epochs": 5, "warmup_epochs": 1}, "optim": {"lr": 0.003}, "run": {"progress": False}})
    t = Trainer(cfg, run_dir=tmp_path / "run", data=load_dataset("digits"))
    t.fit()
    ck = str(t.latest_checkpoint())
    assert main(["export", ck, "-o", str(tmp_path / "m.onnx"), "--legacy"]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime matches PyTorch" in out and "moe, sparse experts" in out
    assert main(["export", ck, "-o", str(tmp_path / "d.onnx"), "--legacy", "--dense-experts"]) == 0
    assert "moe, dense experts" in capsys.readouterr().out
    d = load_dataset("digits")
    paths = []
    for i in range(4):
        p = tmp_path / f"img{i}_label{int(d.y_test[i])}.png"
        Image.fromarray((d.x_test[i, 0].numpy() * 255).astype(np.uint8)).save(p)
        paths.append(str(p))
    (tmp_path / "junk.png").write_bytes(b"not an image")
    assert main(["predict", ck, *paths, str(tmp_path / "junk.png"), "--routing"]) == 0
    out, err = capsys.readouterr()
    assert "skipping" in err and "junk.png" in err
    lines = [ln for ln in out.splitlines() if ln.startswith(str(tmp_path))]
    assert len(lines) == 4 and all(ln.count("%") == 5 for ln in lines)
    assert "expert" in out and "blocks.1.mlp" in out
    # the printed top-1 is the model's prediction on the image as read from the file
    x = torch.from_numpy(np.stack([read_image(p, size=8, channels=1) for p in paths]))
    with torch.no_grad():
        pred = t.model.eval()(x).argmax(-1).tolist()
    assert [ln.split(": ")[1].split()[0] for ln in lines] == [d.classes[i] for i in pred]
    with pytest.raises(SystemExit):
        main(["predict", ck])  # no images given
    assert main(["predict", ck, str(tmp_path / "junk.png")]) == 2
