"""The MoE layer: dense equivalence, shared expert, records, routing keys, errors."""

import pytest
import torch
from timm.layers import Mlp
from torch import nn

from visionmoe.moe import (
    ClusterRouter,
    Experts,
    LinearRouter,
    MoE,
    MoEConfig,
    PooledRouter,
    SortedDispatcher,
    build_moe,
    collect_aux_loss,
    collect_routing_stats,
    routing_key,
)


def _dense_copy_experts(mlp: Mlp, num_experts: int) -> Experts:
    ex = Experts(num_experts, mlp.fc1.in_features, mlp.fc1.out_features)
    with torch.no_grad():
        ex.fc1_weight.copy_(mlp.fc1.weight.expand_as(ex.fc1_weight))
        ex.fc1_bias.copy_(mlp.fc1.bias.expand_as(ex.fc1_bias))
        ex.fc2_weight.copy_(mlp.fc2.weight.expand_as(ex.fc2_weight))
        ex.fc2_bias.copy_(mlp.fc2.bias.expand_as(ex.fc2_bias))
    return ex


@pytest.mark.parametrize("cf", [None, 1.0])
def test_one_expert_top1_equals_dense_mlp(cf):
    # megablocks-style check: E = 1, K = 1 -> gate prob is 1 -> MoE == dense MLP
    mlp = Mlp(8, 32)
    moe = MoE(
        router=LinearRouter(8, 1, k=1),
        experts=_dense_copy_experts(mlp, 1),
        dispatcher=SortedDispatcher(capacity_factor=cf),
    )
    x = torch.randn(2, 7, 8)
    torch.testing.assert_close(moe(x), mlp(x), rtol=1e-5, atol=1e-6)


def test_identical_experts_with_renormalised_topk_equal_dense():
    mlp = Mlp(8, 16)
    moe = MoE(router=LinearRouter(8, 4, k=2, renormalize=True), experts=_dense_copy_experts(mlp, 4))
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(moe(x), mlp(x), rtol=1e-5, atol=1e-6)


def test_shared_expert_is_added():
    mlp, shared = Mlp(8, 16), Mlp(8, 16)
    moe = MoE(
        router=LinearRouter(8, 1, k=1), experts=_dense_copy_experts(mlp, 1), shared_expert=shared
    )
    x = torch.randn(4, 8)
    torch.testing.assert_close(moe(x), mlp(x) + shared(x), rtol=1e-5, atol=1e-6)


def test_records_stats_of_last_forward():
    moe = build_moe(8, 16, MoEConfig(num_experts=4, top_k=2, capacity_factor=0.5))
    moe.train()
    moe(torch.randn(2, 10, 8))
    r = moe.last
    assert r.expert_counts.sum() == 2 * 10 * 2
    assert int(r.kept_counts.max()) <= r.capacity == 5
    assert 0 < float(r.dropped_fraction) < 1
    assert 0 < float(r.gate_entropy) <= torch.log(torch.tensor(4.0))
    s = r.stats()
    assert set(s) >= {"aux_loss", "dropped_fraction", "gate_entropy", "load", "aux_importance"}
    assert sum(s["load"]) == pytest.approx(1.0, abs=1e-3)


def test_aux_loss_collected_from_model_and_differentiable():
    model = nn.Sequential(build_moe(8, 16, MoEConfig(num_experts=4)), build_moe(8, 16, MoEConfig(num_experts=4)))
    model(torch.randn(5, 8))
    aux = collect_aux_loss(model)
    assert aux.requires_grad
    aux.backward()
    assert model[0].router.proj.weight.grad is not None
    torch.testing.assert_close(aux, model[0].last.aux_loss + model[1].last.aux_loss)
    assert set(collect_routing_stats(model)) == {"0", "1"}


def test_image_level_routing_sends_all_tokens_of_an_image_together():
    moe = MoE(router=PooledRouter(LinearRouter(8, 4, k=1), pool="cls"), experts=Experts(4, 8, 16))
    x = torch.randn(3, 6, 8)
    y = moe(x)
    r = moe.last
    assert r.level == "image" and r.indices.shape == (3, 1) and r.tokens_per_unit == 6
    for b in range(3):
        e = int(r.indices[b, 0])
        expected = r.weights[b, 0] * moe.experts.expert(x[b], e)
        torch.testing.assert_close(y[b], expected, rtol=1e-5, atol=1e-6)


def test_routing_key_context_for_cluster_routing():
    moe = MoE(router=ClusterRouter(3, 4, k=1), experts=Experts(4, 8, 16))
    model = nn.Sequential(moe)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="routing_key"):
        model(x)
    with routing_key(model, torch.tensor([0, 2])):
        model(x)
    assert moe.route_key is None  # restored
    assert moe.last.indices.shape == (2, 1)


def test_width_and_expert_count_mismatch_errors():
    with pytest.raises(ValueError, match="num_experts"):
        MoE(router=LinearRouter(8, 3), experts=Experts(4, 8, 16))
    with pytest.raises(ValueError, match="width"):
        MoE(router=LinearRouter(6, 4), experts=Experts(4, 8, 16))
    moe = MoE(router=LinearRouter(8, 4), experts=Experts(4, 8, 16))
    with pytest.raises(ValueError, match="D=8"):
        moe(torch.randn(2, 7))


def test_config_errors_name_the_parameter():
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoEConfig(capacity_factor=0)
    with pytest.raises(ValueError, match="capacity_factor"):
        SortedDispatcher(capacity_factor=-1.0)
    with pytest.raises(ValueError, match="Did you mean 'cosine'"):
        MoEConfig(router="cosin")
    with pytest.raises(ValueError, match="Did you mean 'num_experts'"):
        MoEConfig.from_dict({"num_expert": 4})
    with pytest.raises(ValueError, match="num_keys"):
        MoEConfig(routing="cluster")
    for key in ("recompute_activation", "bpr", "shared_expert"):  # "yes" / 1 are not booleans
        with pytest.raises(ValueError, match=f"moe.{key} must be true or false, got 'yes'"):
            MoEConfig.from_dict({key: "yes"})
    with pytest.raises(ValueError, match="moe.renormalize must be true or false, got 1"):
        MoEConfig(renormalize=1)


def test_gradients_reach_router_and_experts_through_layer():
    moe = build_moe(8, 16, MoEConfig(num_experts=4, top_k=2, noise_std=1.0)).train()
    y = moe(torch.randn(4, 9, 8))
    (y.pow(2).mean() + moe.last.aux_loss).backward()
    assert moe.router.proj.weight.grad.abs().sum() > 0
    assert moe.experts.fc1_weight.grad.abs().sum() > 0


def test_the_router_contract_is_typed_and_checked():
    from visionmoe.moe import Experts, LinearRouter, MoE, PooledRouter
    from visionmoe.moe.routers import RouterLike

    token = LinearRouter(8, 4)
    pooled = PooledRouter(LinearRouter(8, 4), pool="mean")
    assert isinstance(token, RouterLike) and isinstance(pooled, RouterLike)
    assert token.base is token and pooled.base is pooled.router and pooled.level == "image"
    with pytest.raises(TypeError, match="router contract.*subclass visionmoe.moe.Router"):
        MoE(router=torch.nn.Linear(8, 4), experts=Experts(4, 8, 16))
