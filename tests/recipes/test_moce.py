"""MoCE pieces: build from an MAE encoder + clustering, distillation, cluster selection, deployment."""

import pytest
import torch

from visionmoe.clustering import ClusterConfig, fit_clusters
from visionmoe.data import load_dataset
from visionmoe.eval import extract_features
from visionmoe.models import VisionTransformer
from visionmoe.recipes.moce import (
    MoCEObjective,
    build_moce,
    build_sdr,
    deploy,
    expert_choices,
    select_cluster,
)

ARGS = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=3, num_heads=2, num_classes=0)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    enc = VisionTransformer(**ARGS).eval()
    d = load_dataset("digits")
    feats = extract_features(enc, d.x_train[:400])
    cl = fit_clusters(feats, ClusterConfig(num_clusters=4, epochs=3, batch_size=100))
    return enc, d, cl


def test_build_moce_starts_equal_to_the_encoder_when_exact(setup):
    enc, d, cl = setup
    moce = build_moce(enc, cl, blocks=[1, 2], num_experts=3, noise=0.0, renormalize=True).eval()
    assert moce.moe_blocks == [1, 2]
    for _, layer in moce.moe_layers():
        torch.testing.assert_close(layer.router.embed.weight, cl.centroids)
    x = d.x_test[:6]
    keys = torch.tensor([0, 1, 2, 3, 0, 1])
    torch.testing.assert_close(moce.forward_features(x, routing_key=keys), enc.forward_features(x),
                               rtol=1e-5, atol=1e-5)
    # with the distillation teacher equal to the student, the distillation loss is zero
    obj = MoCEObjective(moce, enc, mask_ratio=0.5, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    out = obj(moce, (x, None, keys))
    assert out["distill_loss"].item() < 1e-10
    assert "teacher" not in dict(obj.named_modules())  # the teacher is not trained or saved


def test_perturbed_experts_differ_and_width_mismatch_is_refused(setup):
    enc, _, cl = setup
    moce = build_moce(enc, cl, blocks=[2], num_experts=2, noise=0.05)
    w = moce.blocks[2].mlp.experts.fc1_weight
    assert not torch.equal(w[0], w[1])
    bad = type(cl)(torch.randn(4, 7), cl.config)
    with pytest.raises(ValueError, match="width"):
        build_moce(enc, bad, blocks=[2])


def test_select_cluster_and_deploy_exact(setup):
    enc, d, cl = setup
    moce = build_moce(enc, cl, blocks=[1, 2], num_experts=3, noise=0.05).eval()
    for _, layer in moce.moe_layers():
        torch.nn.init.normal_(layer.router.proj.weight, std=1.0)  # clusters map to different experts
    sel = select_cluster(enc, cl, d.x_test[:100])
    assert sel.histogram.sum() == 100 and sel.histogram[sel.cluster] == sel.histogram.max()
    assert 0 < sel.share <= 1
    dense = deploy(moce, sel.cluster).eval()
    assert not dense.is_moe
    x = d.x_test[:8]
    key = torch.full((8,), sel.cluster)
    torch.testing.assert_close(dense.forward_features(x), moce.forward_features(x, routing_key=key),
                               rtol=1e-5, atol=1e-5)


def test_sdr_sends_each_subset_to_a_fixed_random_expert(setup):
    enc, d, cl = setup  # 4 clusters (subsets), 2 experts: each expert gets 2 subsets in every block
    sdr = build_sdr(enc, cl, blocks=[1, 2], num_experts=2, seed=3)
    choices = expert_choices(sdr)
    for b in range(2):
        assert sorted(choices[k][b][0] for k in range(4)) == [0, 0, 1, 1]
    assert all(not p.requires_grad for _, layer in sdr.moe_layers() for p in layer.router.parameters())
    keys = torch.tensor([0, 1, 2, 3, 3, 2])
    sdr.train()  # the mapping holds in training too (no noise, no learning)
    sdr.forward_features(d.x_test[:6], routing_key=keys)
    for b, (_, layer) in enumerate(sdr.moe_layers()):
        expected = torch.tensor([choices[int(k)][b][0] for k in keys])
        assert torch.equal(layer.last.indices[:, 0], expected)
        torch.testing.assert_close(layer.last.weights, torch.ones(6, 1))  # the whole image to its expert


def test_moce_gate_learns_from_the_mae_and_distillation_losses_with_renormalize(setup):
    """Top-1 with renormalize: the combine weight is 1 in value (the model starts as the encoder)
    but the gate (W_g and the cluster embeddings C) gets the MAE / distillation gradient, and a
    few steps of that loss alone move the cluster-to-expert mapping."""
    enc, d, cl = setup
    torch.manual_seed(1)
    moce = build_moce(enc, cl, blocks=[1, 2], num_experts=3, noise=0.05, renormalize=True, imbalance_weight=0.0)
    obj = MoCEObjective(moce, enc, mask_ratio=0.5, decoder_dim=16, decoder_depth=1, decoder_heads=2,
                        distill_weight=0.01)
    keys = torch.arange(64) % 4
    x = d.x_train[:64]
    moce.train()
    out = obj(moce, (x, None, keys))
    out["loss"].backward()
    for _, layer in moce.moe_layers():
        assert float(layer.router.proj.weight.grad.norm()) > 1e-6  # W_g (was ~1e-11: no gradient)
        assert float(layer.router.embed.weight.grad.norm()) > 1e-7  # C
        assert torch.all(layer.last.weights == 1)  # still exactly 1 in value
    moce.zero_grad()
    before = {n: torch.softmax(l.router.proj(l.router.embed.weight), -1).detach() for n, l in moce.moe_layers()}
    opt = torch.optim.SGD([p for n, p in moce.named_parameters() if ".router." in n], lr=50.0)
    for _ in range(5):
        opt.zero_grad()
        obj(moce, (x, None, keys))["loss"].backward()
        opt.step()
    moved = max(float((torch.softmax(l.router.proj(l.router.embed.weight), -1).detach() - before[n]).abs().max())
                for n, l in moce.moe_layers())
    assert moved > 1e-3


def test_moce_default_noise_is_eq4(setup):
    enc, _, cl = setup
    moce = build_moce(enc, cl, blocks=[2], num_experts=4)
    router = moce.blocks[2].mlp.router
    assert router.noise_std / router.num_experts == pytest.approx(4 ** -0.5)  # eps ~ N(0, 1/N): std 1/sqrt(N)
