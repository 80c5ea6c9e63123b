"""Routers: V-MoE gating semantics, image-level routing, errors, properties."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from visionmoe.moe import ClusterRouter, CosineRouter, L2Router, LinearRouter, PooledRouter, TaskRouter
from visionmoe.moe import losses as L


def test_linear_router_eval_is_softmax_topk_without_renormalisation():
    r = LinearRouter(4, 3, k=2, noise_std=1.0).eval()
    x = torch.randn(5, 4)
    out = r(x)
    probs = (x @ r.proj.weight.t()).softmax(-1)
    w, i = probs.topk(2, dim=-1)
    torch.testing.assert_close(out.probs, probs)
    torch.testing.assert_close(out.weights, w)
    assert torch.equal(out.indices, i)
    assert (out.weights.sum(-1) < 1).all()  # not renormalised
    assert "load" not in out.aux  # no noise in eval


@pytest.mark.parametrize("experts", [2, 4, 8, 15, 16, 64])
def test_expert_softmax_equals_the_plain_softmax_and_its_gradient(experts):
    """The CPU fast path for few experts (softmax over the first axis of the transpose) gives the
    plain softmax's values and gradients; at 16 experts and more it is the plain kernel."""
    from visionmoe.moe.gating import FAST_SOFTMAX_BELOW, expert_softmax

    torch.manual_seed(0)
    x = torch.randn(300, experts, dtype=torch.float64, requires_grad=True)
    w = torch.randn(300, experts, dtype=torch.float64)
    y = expert_softmax(x)
    (gx,) = torch.autograd.grad((y * w).sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = x2.softmax(-1)
    (gx2,) = torch.autograd.grad((y2 * w).sum(), x2)
    torch.testing.assert_close(y, y2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gx, gx2, rtol=1e-12, atol=1e-14)
    assert y.is_contiguous() == (experts >= FAST_SOFTMAX_BELOW)  # the fast path returns the transposed view
    i_top = y.topk(2, dim=-1).indices  # what the gate does next works on the view
    assert torch.equal(i_top, y2.topk(2, dim=-1).indices)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_matches_topk_and_top1_ties_go_to_the_first_expert(k):
    from visionmoe.moe.gating import top_k

    torch.manual_seed(0)
    scores = torch.randn(500, 8)
    values, indices = top_k(scores, k)
    ref = scores.topk(k, dim=-1)
    assert values.shape == indices.shape == (500, k)
    assert torch.equal(values, ref.values) and torch.equal(indices, ref.indices)
    tied = torch.tensor([[0.1, 0.7, 0.7, 0.2]])
    if k == 1:
        assert top_k(tied, 1)[1].tolist() == [[1]]  # max: the first maximal expert


def test_renormalize_makes_weights_sum_to_one():
    r = LinearRouter(4, 3, k=2, renormalize=True)
    out = r(torch.randn(6, 4))
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(6))


def test_training_noise_has_std_noise_over_e():
    E = 4
    r = LinearRouter(2, E, k=1, noise_std=2.0).train()
    with torch.no_grad():
        r.proj.weight.zero_()  # logits are 0: log of the noisy gates recovers the noise
    out = r(torch.randn(20000, 2))
    noise = out.probs.log()
    noise = noise - noise.mean(-1, keepdim=True)  # softmax is shift-invariant
    # centred over E: var = std^2 * (E - 1) / E
    std = (noise.var() * E / (E - 1)).sqrt().item()
    assert std == pytest.approx(2.0 / E, rel=0.05)
    assert "load" in out.aux
    # importance uses the clean gates (uniform here): exactly 0
    assert out.aux["importance"].item() == pytest.approx(0.0, abs=1e-10)


def test_aux_loss_is_weighted_sum():
    r = LinearRouter(4, 3, k=1, noise_std=1.0, aux_weights={"importance": 0.5, "load": 0.25, "z": 1.0}).train()
    out = r(torch.randn(8, 4))
    expected = 0.5 * out.aux["importance"] + 0.25 * out.aux["load"] + out.aux["z"]
    torch.testing.assert_close(out.aux_loss, expected)
    torch.testing.assert_close(out.aux["z"], L.z_loss(out.logits))


@pytest.mark.parametrize("cls", [LinearRouter, CosineRouter, L2Router])
def test_k_greater_than_experts_is_a_clear_error(cls):
    with pytest.raises(ValueError, match="top_k"):
        cls(4, 3, k=4)


def test_unknown_aux_loss_name():
    with pytest.raises(ValueError, match="unknown auxiliary loss"):
        LinearRouter(4, 3, aux_weights={"importnce": 1.0})


def test_cosine_router_logits_are_scaled_cosines():
    r = CosineRouter(8, 4, k=1, proj_dim=4, init_temperature=0.5)
    x = torch.randn(3, 8)
    logits = r.compute_logits(x)
    assert logits.abs().max() <= 2.0 + 1e-5  # |cos| <= 1, scale 1/0.5


def test_l2_router_prefers_nearest_center():
    r = L2Router(2, 3, k=1, scale=1.0)
    with torch.no_grad():
        r.proj.weight.copy_(torch.eye(2))
        r.centers.copy_(torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]]))
    out = r(torch.tensor([[4.0, 1.0], [0.5, 4.5], [0.1, -0.2]]))
    assert out.indices[:, 0].tolist() == [1, 2, 0]


def test_l2_router_measures_distances_in_the_cosine_gates_projected_space():
    """Sweet spot §4.3.5: identical to the Cos gate (a projection to a low-dimensional space)
    except for the distance: logits = -scale * ||x W_p - c_e||^2, by hand."""
    r = L2Router(8, 3, k=1, proj_dim=2, scale=0.5)
    cos = CosineRouter(8, 3, k=1, proj_dim=2)
    assert r.proj.weight.shape == cos.proj.weight.shape == (2, 8) and r.centers.shape == (3, 2)
    with torch.no_grad():
        r.proj.weight.copy_(torch.tensor([[1.0] + [0.0] * 7, [0.0, 2.0] + [0.0] * 6]))
        r.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, -1.0]]))
    x = torch.zeros(1, 8)
    x[0, 0], x[0, 1] = 1.0, 1.0  # projects to (1, 2)
    want = [-0.5 * (1 + 4), -0.5 * 0.0, -0.5 * (4 + 9)]
    torch.testing.assert_close(r.compute_logits(x), torch.tensor([want]))
    assert L2Router(8, 3).scale == pytest.approx(1 / 8 ** 0.5)  # proj_dim capped at the width 8


def test_pooled_router_routes_images_by_cls_token():
    inner = LinearRouter(4, 3, k=1)
    r = PooledRouter(inner, pool="cls")
    x = torch.randn(2, 5, 4)
    out = r(x)
    ref = inner(x[:, 0])
    assert torch.equal(out.indices, ref.indices)
    assert out.indices.shape == (2, 1)
    out_mean = PooledRouter(inner, pool="mean")(x)
    assert torch.equal(out_mean.indices, inner(x.mean(1)).indices)
    with pytest.raises(ValueError, match=r"\(B, T, D\)"):
        r(torch.randn(2, 4))


def test_cluster_router_follows_eq4_and_validates_keys():
    r = ClusterRouter(5, 4, k=1, embed_dim=3).eval()
    key = torch.tensor([0, 3, 3])
    out = r(torch.zeros(3, 2, 6), key)
    expected = (r.embed.weight[key] @ r.proj.weight.t()).softmax(-1)
    torch.testing.assert_close(out.probs, expected)
    assert out.indices[1] == out.indices[2]  # same cluster, same expert
    with pytest.raises(ValueError, match="routing_key"):
        r(torch.zeros(3, 2, 6))
    with pytest.raises(ValueError, match=r"cluster ids must be in \[0, 5\)"):
        r(torch.zeros(1, 2, 6), torch.tensor([5]))
    with pytest.raises(ValueError, match="task"):
        TaskRouter(3, 4)(torch.zeros(1, 1, 1))


def test_cluster_router_from_centroids():
    c = torch.randn(6, 5)
    r = ClusterRouter(0 + 6, 4, centroids=c)
    torch.testing.assert_close(r.embed.weight.data, c)


@settings(max_examples=40, deadline=None)
@given(
    s=st.integers(0, 40),
    e=st.integers(1, 9),
    data=st.data(),
    noise=st.sampled_from([0.0, 1.0]),
    gate=st.sampled_from(["linear", "cosine", "l2"]),
)
def test_router_properties(s, e, data, noise, gate):
    k = data.draw(st.integers(1, e))
    d = 6
    cls = {"linear": LinearRouter, "cosine": CosineRouter, "l2": L2Router}[gate]
    r = cls(d, e, k=k, noise_std=noise).train()
    out = r(torch.randn(s, d) * 3)
    assert out.indices.shape == (s, k) and out.weights.shape == (s, k)
    assert (out.weights >= 0).all() and torch.isfinite(out.weights).all()
    assert ((out.indices >= 0) & (out.indices < e)).all()
    # k distinct experts per token
    for row in out.indices.tolist():
        assert len(set(row)) == k
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(s))
    assert torch.isfinite(out.aux_loss)
