"""The semi-supervised protocols of CR-MoE: a linear classifier on frozen features with few labels,
fine-tuning from the first MLP-head layer with the lr chosen on a validation split."""

import torch

from visionmoe.data import TensorSplits, load_dataset
from visionmoe.eval import head_first_layer, label_subset, linear_probe, semi_finetune, semi_linear
from visionmoe.eval.features import extract_features
from visionmoe.models import VisionTransformer
from visionmoe.objectives.moco import MoCoObjective


def _digits(n_train=600, n_test=200) -> TensorSplits:
    d = load_dataset("digits")
    return TensorSplits("digits", d.x_train[:n_train], d.y_train[:n_train], d.x_test[:n_test], d.y_test[:n_test],
                        d.classes)


def _vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=2, num_heads=2, num_classes=0)


def test_semi_linear_is_a_probe_of_frozen_features_on_the_labelled_subset():
    d, m = _digits(), _vit()
    before = [p.clone() for p in m.parameters()]
    r = semi_linear(m, d, 0.1, seed=3)
    idx = label_subset(d.y_train, fraction=0.1, seed=3)
    want = linear_probe(extract_features(m, d.x_train[idx], pool="cls"), d.y_train[idx],
                        extract_features(m, d.x_test, pool="cls"), d.y_test, num_classes=10)
    assert r["acc"] == want and r["labels"] == len(idx) and 55 <= len(idx) <= 65  # round(0.1 * n_c) per class
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))  # frozen: nothing trained


def test_head_first_layer_from_the_objective_and_from_its_state_dict_agree():
    m = _vit()
    obj = MoCoObjective(m, dim=8, mlp_dim=12)
    with torch.no_grad():
        obj.projector[1].running_mean.normal_()  # BN statistics that must travel with the weights
    a = head_first_layer(obj, 16).eval()
    b = head_first_layer(obj.state_dict(), 16).eval()
    x = torch.randn(5, 16)
    want = torch.relu(obj.projector[1].eval()(x @ obj.projector[0].weight.T))
    assert torch.allclose(a(x), want) and torch.allclose(b(x), want)
    assert head_first_layer({}, 16) is None and head_first_layer(obj, 32) is None  # no head / another width


def test_semi_finetune_chooses_the_lr_on_validation_and_starts_from_the_head(tmp_path):
    d, m = _digits(), _vit()
    head = head_first_layer(MoCoObjective(m, dim=8, mlp_dim=12), 16)
    r = semi_finetune(m, d, 0.2, head=head, lrs=[0.0, 1e-2], steps=100, seed=0, val_size=100, run_dir=tmp_path)
    # lr 0 leaves a random classifier (about chance on validation); the search must not pick it
    assert r["lr"] == 1e-2 and r["val_acc"]["0.01"] > r["val_acc"]["0"] + 0.2
    assert r["val_images"] == 100 and 110 <= r["labels"] <= 130
    assert r["protocol"] == "fine-tune from the first MLP-head layer"
    assert r["acc"] > 0.4  # 10 classes, 120 labels, 100 steps: the fine-tune learned (chance 0.1)
    assert all(p.grad is None for p in m.parameters())  # the caller's backbone is not touched
