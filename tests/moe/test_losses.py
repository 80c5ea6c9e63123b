"""Auxiliary losses against numbers computed by hand."""

import math

import pytest
import torch

from visionmoe.moe import losses as L


def test_importance_loss_hand_computed():
    gates = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    # imp = [1.5, 0.5]; mean 1; population var 0.25 -> 0.25
    assert L.importance_loss(gates).item() == pytest.approx(0.25)
    gates = torch.tensor([[0.2, 0.3, 0.5], [0.4, 0.3, 0.3]])
    # imp = [0.6, 0.6, 0.8]; mean 2/3; var = ((-1/15)^2*2 + (2/15)^2)/3 = (6/225)/3 = 2/225
    assert L.importance_loss(gates).item() == pytest.approx((2 / 225) / (4 / 9))


def test_importance_loss_uniform_is_zero_with_gradient():
    gates = torch.full((4, 3), 1 / 3, requires_grad=True)
    loss = L.importance_loss(gates)
    loss.backward()
    assert loss.item() == pytest.approx(0.0)
    assert torch.isfinite(gates.grad).all()


def _phi(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_load_loss_hand_computed():
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.5, 0.0]])
    noisy = torch.tensor([[1.2, 0.1, -0.9], [-0.1, 0.4, 0.3]])
    std = 0.5
    # k = 1: thresholds = max noisy logit = [1.2, 0.4]
    p0 = [1 - _phi((1.2 - v) / std) for v in (1.0, 0.0, -1.0)]
    p1 = [1 - _phi((0.4 - v) / std) for v in (0.0, 0.5, 0.0)]
    load = [(a + b) / 2 for a, b in zip(p0, p1)]
    mean = sum(load) / 3
    var = sum((v - mean) ** 2 for v in load) / 3
    assert L.load_loss(logits, noisy, std, k=1).item() == pytest.approx(var / mean**2, rel=1e-5)
    # k = 2: thresholds = second largest = [0.1, 0.3]
    p0 = [1 - _phi((0.1 - v) / std) for v in (1.0, 0.0, -1.0)]
    p1 = [1 - _phi((0.3 - v) / std) for v in (0.0, 0.5, 0.0)]
    load = [(a + b) / 2 for a, b in zip(p0, p1)]
    mean = sum(load) / 3
    var = sum((v - mean) ** 2 for v in load) / 3
    assert L.load_loss(logits, noisy, std, k=2).item() == pytest.approx(var / mean**2, rel=1e-5)


def test_load_loss_rejects_bad_arguments():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="noise_std"):
        L.load_loss(x, x, 0.0, 1)
    with pytest.raises(ValueError, match="k must be"):
        L.load_loss(x, x, 1.0, 4)


def test_gshard_loss_hand_computed():
    gates = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    top1 = torch.tensor([0, 1])
    # f = [.5, .5], P = [.55, .45] -> 2 * (.275 + .225) = 1.0
    assert L.gshard_loss(gates, top1).item() == pytest.approx(1.0)
    top1 = torch.tensor([0, 0])
    # f = [1, 0] -> 2 * .55 = 1.1
    assert L.gshard_loss(gates, top1).item() == pytest.approx(1.1)


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp = [log 2, log 4]
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert L.z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_imbalance_loss_hand_computed():
    gates = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    # row 0: std 0 -> 0 ; row 1: mean .5, pop std .4 -> (0.8)^2 = .64
    assert L.imbalance_loss(gates, reduction="sum").item() == pytest.approx(-0.64)
    assert L.imbalance_loss(gates).item() == pytest.approx(-0.32)
    # sharper gates give a lower (better) loss
    assert L.imbalance_loss(torch.tensor([[1.0, 0.0]])) < L.imbalance_loss(torch.tensor([[0.6, 0.4]]))
    with pytest.raises(ValueError, match="reduction"):
        L.imbalance_loss(gates, reduction="max")


def test_distillation_loss_hand_computed():
    s = torch.tensor([[1.0, 2.0]], requires_grad=True)
    t = torch.tensor([[0.0, 4.0]], requires_grad=True)
    loss = L.distillation_loss(s, t)
    assert loss.item() == pytest.approx((1 + 4) / 2)
    loss.backward()
    assert t.grad is None and s.grad is not None
    with pytest.raises(ValueError, match="shapes differ"):
        L.distillation_loss(s, torch.zeros(2, 2))


def test_losses_reject_wrong_rank():
    with pytest.raises(ValueError, match=r"\(S, E\)"):
        L.importance_loss(torch.zeros(3))


def _break_files(layer, x):
    from .helpers import explain_training

    return {b.user_stack[-1].filename.rsplit("/", 1)[-1] for b in explain_training(layer, x).break_reasons
            if b.user_stack}


def test_expert_counts_is_bincount_with_a_static_shape_and_no_graph_break():
    import torch

    from visionmoe.moe import MoEConfig, build_moe
    from visionmoe.moe import losses as L

    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 5, (7, 3), generator=g)
    assert torch.equal(L.expert_counts(idx, 8), torch.bincount(idx.reshape(-1), minlength=8))
    assert L.expert_counts(idx, 8)[5:].sum() == 0 and L.expert_counts(idx[:0], 3).tolist() == [0, 0, 0]
    assert torch.equal(L.expert_counts(torch.tensor([2, 2, 0]), 3), torch.tensor([1, 0, 2]))  # by hand
    # in a training MoE layer with the GShard loss and capacity, neither the losses nor the router
    # break the compiled graph any more (the per-expert matmuls' sizes still do, in experts.py)
    torch.manual_seed(0)
    layer = build_moe(16, 32, MoEConfig(num_experts=4, top_k=2, capacity_factor=1.25, aux_weights={"gshard": 0.01}))
    layer.train()
    x = torch.randn(2, 5, 16)
    files = _break_files(layer, x)
    assert "losses.py" not in files and "gating.py" not in files, files
