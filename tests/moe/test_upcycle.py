"""moeify on real timm models and the pure upcycle / extract mappings."""

import pytest
import timm
import torch

from visionmoe.moe import MoE, extract_expert_state_dict, moeify, upcycle_state_dict


def _diff(a, b):
    return (a - b).abs().max().item()


def test_moeify_timm_vit_equals_dense_before_training():
    dense = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=4, pretrained=False)
    dense.eval()
    x = torch.randn(2, 3, 32, 32)
    ref = dense(x)
    moeify(dense, placement="every_2", num_experts=4, top_k=2, renormalize=True)
    layers = [m for m in dense.modules() if isinstance(m, MoE)]
    assert len(layers) == 6
    assert _diff(dense(x), ref) < 1e-5
    assert all(m.last is not None for m in layers)


def test_moeify_timm_convnext_token_and_image_level():
    x = torch.randn(2, 3, 64, 64)
    for routing in ("token", "mean"):
        m = timm.create_model("convnext_atto", num_classes=4, pretrained=False).eval()
        ref = m(x)
        moeify(m, placement="last_2", num_experts=4, top_k=1, renormalize=True, routing=routing)
        layers = [mod for mod in m.modules() if isinstance(mod, MoE)]
        assert len(layers) == 2
        assert _diff(m(x), ref) < 1e-5
        if routing == "mean":
            assert layers[0].last.level == "image" and layers[0].last.indices.shape == (2, 1)


def test_moeify_perturbed_experts_differ_and_train():
    m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=4, pretrained=False)
    moeify(m, placement="last_2", num_experts=3, noise=0.01, seed=1)
    layer = m.blocks[-1].mlp
    w = layer.experts.fc1_weight
    assert not torch.equal(w[0], w[1])
    loss = m(torch.randn(2, 3, 32, 32)).sum() + sum(mod.last.aux_loss for mod in m.modules() if isinstance(mod, MoE))
    loss.backward()
    assert layer.router.proj.weight.grad is not None


def test_moeify_errors():
    with pytest.raises(ValueError, match="no blocks"):
        moeify(torch.nn.Linear(3, 3))
    m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, pretrained=False)
    with pytest.raises(ValueError, match="out of range"):
        moeify(m, placement=[40])


def test_upcycle_then_extract_round_trip_is_exact():
    m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, pretrained=False)
    sd = m.state_dict()
    up = upcycle_state_dict(sd, [1, 3], num_experts=4)
    assert "blocks.1.mlp.experts.fc1_weight" in up and "blocks.1.mlp.fc1.weight" not in up
    assert up["blocks.1.mlp.experts.fc1_weight"].shape == (4, *sd["blocks.1.mlp.fc1.weight"].shape)
    back = extract_expert_state_dict(up, {1: 2, 3: 0})
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    with pytest.raises(ValueError, match="no selected expert"):
        extract_expert_state_dict(up, {1: 0})
    scaled = extract_expert_state_dict(up, {1: (0, 0.5), 3: 0})
    torch.testing.assert_close(scaled["blocks.1.mlp.fc2.weight"], 0.5 * sd["blocks.1.mlp.fc2.weight"])
    torch.testing.assert_close(scaled["blocks.1.mlp.fc1.weight"], sd["blocks.1.mlp.fc1.weight"])
