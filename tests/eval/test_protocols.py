import pytest
import torch

from visionmoe.eval import few_shot, label_subset, linear_probe, routing_consistency


def test_label_subset_takes_exact_counts_per_class():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 7)
    idx = label_subset(y, fraction=0.1, seed=1)
    assert torch.bincount(y[idx]).tolist() == [5, 3, 1]  # round(0.1 * n), at least one
    assert len(set(idx.tolist())) == len(idx)
    idx = label_subset(y, shots=4, seed=2)
    assert torch.bincount(y[idx]).tolist() == [4, 4, 4]
    assert not torch.equal(idx, label_subset(y, shots=4, seed=3))  # another split
    with pytest.raises(ValueError, match="fewer than"):
        label_subset(y, shots=10)
    with pytest.raises(ValueError, match="exactly one"):
        label_subset(y)


def test_linear_probe_and_few_shot_on_real_digits():
    from visionmoe.data import load_dataset

    d = load_dataset("digits")
    tr, te = d.x_train.flatten(1), d.x_test.flatten(1)
    acc = linear_probe(tr, d.y_train, te, d.y_test)
    assert acc > 0.9  # logistic regression on 8x8 pixels: ~96%
    fs = few_shot(tr, d.y_train, te, d.y_test, shots=4, episodes=4)
    assert 0.5 < fs["mean"] < acc + 0.02 and fs["episodes"] == 4
    assert fs["ci95"] == pytest.approx(1.96 * fs["std"] / 2)


def test_routing_consistency_is_full_for_position_routing_and_chance_for_random_pairs():
    from visionmoe.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=16, depth=2, num_heads=2,
                              num_classes=0, moe=dict(num_experts=4, top_k=1, placement=[1], noise_std=0.0))
    res = routing_consistency(model, torch.rand(32, 1, 16, 16))
    r = res[1]
    assert r["k"] == 1 and 0 <= r["random"] <= 1 and 0 <= r["matched"] <= 1

    class Fixed(torch.nn.Module):  # identity view pairs: matched tokens are the same token
        def __call__(self, x):
            g = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0]).expand(len(x), 5)
            return x, g, x, g

    same = routing_consistency(model, torch.rand(32, 1, 16, 16), augment=Fixed())[1]
    assert same["matched"] == 1.0 and same["random"] < 1.0
    assert same["cls_matched"] == 1.0 and 0 <= same["cls_random"] <= 1  # identical views: the same CLS expert
    # the no-crop setting: both views are the whole image (every patch matches its own position)
    nocrop = routing_consistency(model, torch.rand(32, 1, 16, 16), crop=False)[1]
    assert 0 <= nocrop["matched"] <= 1 and {"cls_matched", "cls_random"} <= set(nocrop)
    from visionmoe.objectives.moco import TwoViewAugment

    _, g1, _, g2 = TwoViewAugment(16, scale=(1.0, 1.0), ratio=(1.0, 1.0))(torch.rand(4, 1, 16, 16))
    assert torch.allclose(g1[:, :4], torch.tensor([0.0, 0.0, 1.0, 1.0])) and torch.allclose(g2[:, :4], g1[:, :4])
