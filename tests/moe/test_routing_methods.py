"""Expert choice, loss-free balancing, sigmoid gating and Soft MoE against independent
references: per-expert / per-token loops and the papers' formulas on hand numbers."""

import math

import pytest
import torch

from visionmoe.moe import (
    Experts,
    LinearRouter,
    MoE,
    MoEConfig,
    PooledRouter,
    SoftMoE,
    SoftRouter,
    build_moe,
    moeify,
    update_balance_biases,
)


def _experts(e=4, d=6, h=8, seed=0):
    torch.manual_seed(seed)
    return Experts(e, d, h)


# ------------------------------------------------------------------ expert choice
def _ec_reference(probs: torch.Tensor, c: int) -> torch.Tensor:
    """(S, E) bool: expert e takes the c units of highest probability, earlier unit first on ties."""
    s, e = probs.shape
    chosen = torch.zeros(s, e, dtype=torch.bool)
    for j in range(e):
        order = sorted(range(s), key=lambda i: (-float(probs[i, j].detach()), i))
        for i in order[:c]:
            chosen[i, j] = True
    return chosen


def _combine_loop(x, chosen, probs, experts):
    """sum over the experts that took unit i of gate * expert(x_i), one unit and expert at a time."""
    want = torch.zeros_like(x)
    for i, j in chosen.nonzero().tolist():
        want[i] += probs[i, j] * experts.expert(x[i : i + 1], j)[0]
    return want


def test_expert_choice_matches_a_per_expert_loop():
    torch.manual_seed(0)
    r = LinearRouter(6, 4, selection="expert_choice", capacity_factor=2.0, aux_weights={})
    experts = _experts()
    moe = MoE(router=r, experts=experts).train()
    x = torch.randn(10, 6)
    y = moe(x)
    probs = r.proj(x).softmax(-1)
    c = math.ceil(2.0 * 10 / 4)  # 5 units per expert
    chosen = _ec_reference(probs, c)
    torch.testing.assert_close(y, _combine_loop(x, chosen, probs, experts), rtol=1e-5, atol=1e-6)
    # every expert took exactly C units; a unit gets 0..E experts, E*C assignments in all
    assert moe.last.kept_counts.tolist() == [c] * 4
    hist = moe.last.extra["experts_per_unit"]
    assert hist.sum() == 10 and (hist * torch.arange(5)).sum() == 4 * c
    assert torch.equal(hist, torch.bincount(chosen.sum(-1), minlength=5))
    assert moe.last.stats()["experts_per_unit"][0] == pytest.approx(float(hist[0]) / 10, abs=1e-4)
    # the gradient reaches the router through the chosen gate values
    y.sum().backward()
    assert r.proj.weight.grad.abs().sum() > 0


def test_expert_choice_ties_keep_the_earlier_units_and_eval_factor_applies():
    r = LinearRouter(3, 2, selection="expert_choice", capacity_factor=1.0, eval_capacity_factor=2.0, aux_weights={})
    with torch.no_grad():
        r.proj.weight.zero_()  # every probability 0.5: all ties
    out = r.train()(torch.randn(6, 3))
    assert out.chosen.any(-1).tolist() == [True] * 3 + [False] * 3  # C = 3: units 0-2, for both experts
    assert r.eval().expert_choice_capacity(6) == 6  # ceil(2 * 6 / 2)
    assert (r(torch.randn(6, 3)).chosen.sum(-1) == 2).all()


def test_expert_choice_with_image_level_units():
    torch.manual_seed(1)
    inner = LinearRouter(6, 4, selection="expert_choice", capacity_factor=1.0, aux_weights={})
    moe = MoE(router=PooledRouter(inner, pool="cls"), experts=_experts()).eval()
    x = torch.randn(8, 5, 6)  # 8 images of 5 tokens
    y = moe(x)
    probs = inner.proj(x[:, 0]).softmax(-1)
    chosen = _ec_reference(probs, 2)  # ceil(8 / 4) images per expert
    want = torch.zeros_like(x)
    for b in range(8):
        for j in range(4):
            if chosen[b, j]:
                want[b] += probs[b, j] * moe.experts.expert(x[b], j)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    assert moe.last.tokens_per_expert.tolist() == [2 * 5] * 4


def test_expert_choice_from_config_needs_no_aux_loss_and_refuses_balance():
    layer = build_moe(6, 8, MoEConfig(num_experts=4, selection="expert_choice", capacity_factor=1.5))
    assert layer.router.selection == "expert_choice" and layer.router.capacity_factor == 1.5
    assert layer.router.aux_weights == {} and layer.dispatcher.capacity_factor is None
    with pytest.raises(ValueError, match="balanced by construction"):
        MoEConfig(selection="expert_choice", balance="loss_free")
    with pytest.raises(ValueError, match=r"unknown moe.selection 'expert_choise'.*expert_choice"):
        MoEConfig(selection="expert_choise")


# ------------------------------------------------------------------ loss-free balancing
def test_loss_free_bias_selects_but_does_not_weight():
    r = LinearRouter(3, 3, k=1, balance="loss_free", balance_rate=0.1, aux_weights={}).train()
    x = torch.randn(5, 3)
    with torch.no_grad():
        r.balance_bias.copy_(torch.tensor([0.0, 0.0, 10.0]))  # expert 2 wins every selection
    out = r(x)
    probs = r.proj(x).softmax(-1)
    assert out.indices[:, 0].tolist() == [2] * 5
    torch.testing.assert_close(out.weights[:, 0], probs[:, 2])  # the unbiased gate value
    assert r.load_count.tolist() == [0.0, 0.0, 5.0]
    # bias += rate * sign(mean load - load): mean 5/3, loads (0, 0, 5)
    assert update_balance_biases(torch.nn.Sequential(r)) == 1
    torch.testing.assert_close(r.balance_bias, torch.tensor([0.1, 0.1, 9.9]))
    assert r.load_count.sum() == 0  # counted afresh for the next step
    assert "balance_bias" in r.state_dict() and "load_count" not in r.state_dict()  # saved in checkpoints


def test_sigmoid_scores_normalised_over_the_chosen_k():
    r = LinearRouter(4, 4, k=2, score="sigmoid", aux_weights={})
    x = torch.randn(3, 4)
    out = r.eval()(x)
    s = r.proj(x).sigmoid()
    top = s.topk(2, dim=-1)
    torch.testing.assert_close(out.weights, top.values / top.values.sum(-1, keepdim=True))
    assert torch.equal(out.indices, top.indices)
    r1 = LinearRouter(4, 4, k=1, score="sigmoid", aux_weights={})  # k=1: weight 1, still a gradient
    w = r1(x).weights
    torch.testing.assert_close(w, torch.ones_like(w))
    w.sum().backward()
    assert r1.proj.weight.grad is not None


def test_trainer_moves_loss_free_biases_and_resumes_them(tmp_path):
    from visionmoe.train import Trainer, load_trained_model

    cfg = {"model": {"name": "vmoe_mini_patch4_28", "args": {"img_size": 8, "patch_size": 4, "embed_dim": 16,
                                                          "depth": 2, "num_heads": 2}},
           "moe": {"num_experts": 4, "top_k": 1, "placement": "last_1", "balance": "loss_free", "balance_rate": 0.01,
                   "aux_weights": {}},
           "data": {"name": "digits", "batch_size": 16, "augment": "none"},
           "schedule": {"max_steps": 3, "warmup_epochs": 0.0},
           "run": {"progress": False, "print_eval": False, "eval_every_epochs": 1e9}}
    tr = Trainer(cfg, run_dir=tmp_path / "run")
    tr.fit()
    (name, moe), = tr.model.moe_layers()
    bias = moe.router.balance_bias
    assert bias.abs().sum() > 0 and (bias.abs() <= 3 * 0.01 + 1e-6).all()  # three steps of +-0.01
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("*.safetensors"))[-1]
    model, _, _ = load_trained_model(ckpt)
    torch.testing.assert_close(dict(model.moe_layers())[name].router.balance_bias, bias)


# ------------------------------------------------------------------ Soft MoE
def test_soft_moe_matches_the_papers_formulas_per_slot():
    torch.manual_seed(0)
    router = SoftRouter(6, 3, slots_per_expert=2)
    experts = _experts(e=3)
    moe = SoftMoE(router=router, experts=experts)
    x = torch.randn(2, 5, 6)
    y = moe(x)
    for b in range(2):
        xn = x[b] / x[b].norm(dim=-1, keepdim=True)
        phi = router.phi / router.phi.norm(dim=0, keepdim=True)
        logits = router.scale * xn @ phi  # (T, n)
        dispatch, combine = logits.softmax(0), logits.softmax(1)
        outs = []
        for s in range(6):  # slot s belongs to expert s // p
            slot = (dispatch[:, s : s + 1] * x[b]).sum(0, keepdim=True)
            outs.append(experts.expert(slot, s // 2)[0])
        want = combine @ torch.stack(outs)
        torch.testing.assert_close(y[b], want, rtol=1e-4, atol=1e-5)
    assert moe.last.kept_counts.tolist() == [2 * 2] * 3 and float(moe.last.dropped_fraction) == 0
    torch.testing.assert_close(moe.last.weights.sum(-1), torch.ones(2))  # each image's combine mass
    y.sum().backward()
    assert router.phi.grad.abs().sum() > 0 and router.scale.grad is not None


def test_soft_moe_in_config_moeify_and_refusals():
    import timm

    m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2)
    m.eval()
    moeify(m, placement="last_1", num_experts=4, router="soft", slots_per_expert=2)
    out = m(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    assert isinstance(m.blocks[1].mlp, SoftMoE)
    with pytest.raises(ValueError, match="leave moe.routing=token"):
        MoEConfig(router="soft", routing="cls")
    with pytest.raises(ValueError, match=r"\(B, T, D\)"):
        build_moe(6, 8, MoEConfig(router="soft", num_experts=2))(torch.randn(4, 6))


def test_router_args_reach_the_gate_and_bad_ones_are_named():
    layer = build_moe(16, 8, MoEConfig(num_experts=2, router="cosine", router_args={"proj_dim": 4}))
    assert layer.router.proj.weight.shape == (4, 16)
    layer = build_moe(16, 8, MoEConfig(num_experts=2, router="l2", router_args={"proj_dim": 3, "scale": 2.0}))
    assert layer.router.centers.shape == (2, 3) and layer.router.scale == 2.0
    with pytest.raises(ValueError, match=r"moe.router_args \['proj_dmi'\] do not fit the 'cosine' gate"):
        build_moe(16, 8, MoEConfig(num_experts=2, router="cosine", router_args={"proj_dmi": 4}))


def test_several_shared_experts_upcycle_to_the_dense_function():
    import timm

    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    dense_mlp = m.blocks[1].mlp
    tokens = torch.randn(2, 17, 192)
    want = dense_mlp(tokens)
    moeify(m, placement="last_1", num_experts=4, shared_expert=True, num_shared_experts=3)
    shared = m.blocks[1].mlp.shared_expert
    assert shared.fc1.weight.shape == (3 * 768, 192)
    torch.testing.assert_close(shared(tokens), want, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(m(x)).all()
    # a config's model.init takes the same route: dense weights into 3 shared experts, zero-routed
    from visionmoe.models import load_dense_into_moe
    from visionmoe.models.vit import VisionTransformer

    args = dict(img_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3, num_classes=3)
    dense = VisionTransformer(**args).eval()
    moe = VisionTransformer(**args, moe=dict(num_experts=4, placement="all", shared_expert=True,
                                             num_shared_experts=3)).eval()
    load_dense_into_moe(moe, dense.state_dict(), shared_init="zero_routed")
    torch.testing.assert_close(moe(x), dense(x), rtol=1e-5, atol=1e-5)


def test_moeify_fine_grained_with_a_narrower_shared_expert_starts_it_fresh():
    """A shared expert narrower than the dense MLP (``shared_ratio: 1`` = D units, the MLP has 4D)
    cannot hold the dense weights: it starts fresh (it was a raw size-mismatch error), while a
    shared expert of the dense width still equals the dense MLP."""
    import timm

    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2).eval()
    tokens = torch.randn(2, 17, 192)
    want = m.blocks[1].mlp(tokens)
    moeify(m, placement="last_1", num_experts=16, top_k=3, expert_ratio=1.0, shared_expert=True, shared_ratio=1.0)
    layer = m.blocks[1].mlp
    assert layer.experts.hidden == 192 and layer.shared_expert.fc1.weight.shape == (192, 192)
    assert (layer.shared_expert(tokens) - want).abs().max() > 1e-2  # not the dense MLP: it cannot be
    assert torch.isfinite(m(torch.randn(2, 3, 32, 32))).all()
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2).eval()
    moeify(m, placement="last_1", num_experts=16, top_k=3, expert_ratio=1.0, shared_expert=True, shared_ratio=4.0)
    torch.testing.assert_close(m.blocks[1].mlp.shared_expert(tokens), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ every kernel, export, compile
@pytest.mark.parametrize("kind", ["expert_choice", "soft"])
def test_new_layers_agree_across_expert_kernels(kind):
    from .test_dispatch import _experts_kwargs, _impls

    x0 = torch.randn(4, 6, 16)
    results = {}
    for impl in _impls():
        torch.manual_seed(0)
        experts = Experts(4, 16, 32, **_experts_kwargs(impl))
        if kind == "soft":
            moe = SoftMoE(router=SoftRouter(16, 4, slots_per_expert=2), experts=experts)
        else:
            moe = MoE(router=LinearRouter(16, 4, selection="expert_choice", aux_weights={}), experts=experts)
        x = x0.clone().requires_grad_(True)
        y = moe.train()(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results[impl] = (y, x.grad, *[p.grad for p in moe.parameters()])
    ref = results.pop("split")
    for impl, got in results.items():
        for a, b in zip(ref, got):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=impl)


@pytest.mark.parametrize("moe", [{"selection": "expert_choice"}, {"router": "soft", "slots_per_expert": 2},
                                 {"balance": "loss_free", "top_k": 1}, {"score": "sigmoid"}])
def test_new_routing_exports_to_onnx_and_matches(moe, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from visionmoe import create_model
    from visionmoe.export import export_onnx, static_moe

    m = create_model("vmoe_nano_patch4_32", img_size=8, patch_size=2, embed_dim=24, depth=2, num_heads=2,
                     num_classes=10, in_chans=1, moe={"num_experts": 4, "top_k": 2, "placement": "all", **moe}).eval()
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        ref = m(x)
        with static_moe(m):
            torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    res = export_onnx(m, tmp_path / "m.onnx")
    assert res["max_abs_diff"] <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("moe", [{"selection": "expert_choice"}, {"router": "soft"}, {"balance": "loss_free"}])
def test_new_routing_under_torch_compile(moe):
    from visionmoe import create_model

    torch.manual_seed(0)
    m = create_model("vmoe_nano_patch4_32", num_classes=5, depth=2, moe={"num_experts": 4, "placement": "all",
                                                                       **moe}).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = m(x)
    compiled = torch.compile(m)
    torch.testing.assert_close(compiled(x), ref, rtol=1e-4, atol=1e-4)
    m.train()
    compiled(x).sum().backward()
    assert m.blocks[1].mlp.experts.fc1_weight.grad is not None


# ------------------------------------------------------------------ placement by gradient magnitude
def test_by_gradient_magnitude_from_a_config_probes_the_objective(tmp_path):
    from visionmoe.analysis.gradients import gradient_magnitude_scores
    from visionmoe.moe.placement import resolve_placement
    from visionmoe.train import Trainer, load_trained_model

    cfg = {"model": {"name": "vmoe_mini_patch4_28", "args": {"img_size": 8, "patch_size": 4, "embed_dim": 16,
                                                          "depth": 4, "num_heads": 2}},
           "moe": {"num_experts": 2, "placement": "by_gradient_magnitude_1"},
           "data": {"name": "digits", "batch_size": 16, "augment": "none"},
           "schedule": {"max_steps": 1, "warmup_epochs": 0.0},
           "run": {"progress": False, "print_eval": False, "eval_every_epochs": 1e9}}
    tr = Trainer(cfg, run_dir=tmp_path / "run")
    scores = tr.placement_scores
    assert len(scores) == 4 and tr.cfg.moe["placement"] == [max(range(4), key=scores.__getitem__)]
    assert [i for i, b in enumerate(tr.model.blocks) if hasattr(b.mlp, "router")] == tr.cfg.moe["placement"]
    assert "MLP gradient magnitudes" in tr.describe()
    tr.fit()
    ckpt = next((tmp_path / "run" / "checkpoints").glob("*.safetensors"))
    load_trained_model(ckpt)  # rebuilds from the resolved placement, no probe needed
    # moeify takes scores computed by hand
    import timm

    m = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=3, num_classes=2)
    s = gradient_magnitude_scores(m, [torch.randn(2, 3, 16, 16)], lambda mm, x: mm(x).pow(2).mean())
    moeify(m, placement="by_gradient_magnitude_2", placement_scores=s, num_experts=2)
    moe_blocks = [i for i, b in enumerate(m.blocks) if isinstance(b.mlp, MoE)]
    assert moe_blocks == resolve_placement("by_gradient_magnitude", 3, scores=s, num_layers=2)
    with pytest.raises(ValueError, match="first_n needs 0 <= n <= depth=3"):
        resolve_placement("first_4", 3)


# ------------------------------------------------------------------ upcycling with a shared expert
def test_zero_routed_upcycling_starts_exactly_as_the_dense_model(tmp_path):
    import timm

    from visionmoe.models import load_dense_into_moe
    from visionmoe.models.vit import VisionTransformer

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2).eval()
    ref = m(x)
    moeify(m, placement="all", num_experts=4, top_k=1, shared_expert=True, shared_init="zero_routed")
    assert torch.equal(m(x), ref)  # exactly: the routed experts add zeros
    dense_sd = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2).state_dict()
    args = dict(img_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3, num_classes=3)
    dense = VisionTransformer(**args).eval()
    dense.load_state_dict(dense_sd)
    moe = VisionTransformer(**args, moe=dict(num_experts=4, top_k=1, placement="all", shared_expert=True)).eval()
    load_dense_into_moe(moe, dense_sd, shared_init="zero_routed")
    assert torch.equal(moe(x), dense(x))
    load_dense_into_moe(moe, dense_sd)  # "copy": dense + w * dense, not the dense model
    assert not torch.allclose(moe(x), dense(x))
    with pytest.raises(ValueError, match="shared_init must be one of"):
        load_dense_into_moe(moe, dense_sd, shared_init="halves")


def test_noise_defaults_agree_between_variants_moeify_and_bare_configs():
    from visionmoe import create_model
    from visionmoe.moe import moe_layers

    bare = MoEConfig()
    variant = dict(moe_layers(create_model("vmoe_tiny_patch4_32")))
    assert bare.noise_std == 1.0 == next(iter(variant.values())).router.noise_std
    import timm

    m = moeify(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), placement="all")
    assert all(layer.router.noise_std == 1.0 for _, layer in moe_layers(m))
    out = build_moe(8, 16, bare).train()(torch.randn(4, 5, 8))
    assert out.shape == (4, 5, 8)
    assert "load" in build_moe(8, 16, bare).train().router(torch.randn(6, 8)).aux  # the default load loss acts


def test_flops_do_not_depend_on_threads_and_match_the_routing():
    from visionmoe import create_model
    from visionmoe.sweep import flops_per_image

    torch.manual_seed(0)
    kw = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10, in_chans=1)
    x = torch.randn(8, 1, 16, 16)
    dense = create_model("vit_nano_patch4_32", **kw)
    top1 = create_model("vmoe_nano_patch4_32", **kw, moe=dict(num_experts=4, top_k=1, placement="all",
                                                              capacity_factor=None, eval_capacity_factor=None))
    top2 = create_model("vmoe_nano_patch4_32", **kw, moe=dict(num_experts=4, top_k=2, placement="all",
                                                              capacity_factor=None, eval_capacity_factor=None))
    threads = torch.get_num_threads()
    try:
        counts = []
        for n in (1, 2):
            torch.set_num_threads(n)
            counts.append([flops_per_image(m, x) for m in (dense, top1, top2)])
    finally:
        torch.set_num_threads(threads)
    assert counts[0] == counts[1]
    d, t1, t2 = counts[0]
    tokens, width, hidden, layers = 17, 32, 128, 2  # 16 patches + CLS; mlp_ratio 4
    mlp = 2 * 2 * tokens * width * hidden  # fc1 + fc2, 2 FLOPs per multiply-add
    router = 2 * tokens * width * 4
    assert t1 - d == pytest.approx(layers * router)  # top-1: the same expert work as the dense MLP
    assert t2 - d == pytest.approx(layers * (router + mlp))  # top-2: twice the MLP


# ------------------------------------------------------------------ gated (SwiGLU) experts
@pytest.mark.parametrize("mlp", ["GluMlp", "SwiGLUPacked", "SwiGLU"])
def test_gated_mlps_upcycle_to_the_same_function(mlp):
    import timm.layers as tl

    from visionmoe.models.vit import VisionTransformer

    torch.manual_seed(0)
    layer = {"GluMlp": tl.GluMlp, "SwiGLUPacked": tl.SwiGLUPacked, "SwiGLU": tl.SwiGLU}[mlp]
    kw = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3, mlp_layer=layer)
    if mlp == "GluMlp":
        kw["mlp_ratio"] = 4  # GluMlp halves its hidden width: fc1 128 -> 2 x 64
    dense = VisionTransformer(**kw).eval()
    x = torch.randn(2, 3, 16, 16)
    ref = dense(x)
    m = VisionTransformer(**kw).eval()
    m.load_state_dict(dense.state_dict())
    moeify(m, placement="all", num_experts=3, top_k=1, renormalize=True, shared_expert=True, num_shared_experts=2,
           shared_init="zero_routed")
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
    m2 = VisionTransformer(**kw).eval()
    m2.load_state_dict(dense.state_dict())
    moeify(m2, placement="all", num_experts=3, top_k=1, renormalize=True)  # each expert the dense GLU MLP
    torch.testing.assert_close(m2(x), ref, rtol=1e-5, atol=1e-5)
    assert m2.blocks[0].mlp.experts.gated
    # built from a config: gated experts, not ungated SiLU ones of the packed width
    built = VisionTransformer(**kw, moe=dict(num_experts=2, top_k=1, placement="all"))
    dense_hidden = dense.blocks[0].mlp.fc2.in_features
    assert built.blocks[0].mlp.experts.gated and built.blocks[0].mlp.experts.hidden == dense_hidden
    built.train()(x).sum().backward()


def test_a_dense_swiglu_checkpoint_loads_into_a_configured_moe_as_the_same_function():
    """model.init's path: a dense ViT with timm's unpacked SwiGLU (fc1_x / fc1_g keys) upcycled
    into a MoE ViT built from a config; each top-1 expert is the dense MLP, so the outputs match."""
    import timm.layers as tl

    from visionmoe.models import load_dense_into_moe
    from visionmoe.models.vit import VisionTransformer
    from visionmoe.moe.upcycle import pack_swiglu

    torch.manual_seed(0)
    kw = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3, mlp_layer=tl.SwiGLU)
    dense = VisionTransformer(**kw).eval()
    sd = dense.state_dict()
    assert "blocks.1.mlp.fc1_g.weight" in sd
    moe = VisionTransformer(**kw, moe=dict(num_experts=2, top_k=1, placement="last_1", renormalize=True)).eval()
    load_dense_into_moe(moe, sd)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(moe(x), dense(x), rtol=1e-5, atol=1e-5)
    packed = pack_swiglu({k[len("blocks.1.mlp."):]: v for k, v in sd.items() if k.startswith("blocks.1.mlp.")})
    h = sd["blocks.1.mlp.fc1_x.weight"].shape[0]
    assert torch.equal(packed["fc1.weight"][:h], sd["blocks.1.mlp.fc1_x.weight"])  # [x; gate]
    assert torch.equal(packed["fc1.weight"][h:], sd["blocks.1.mlp.fc1_g.weight"])


def test_eva02_swiglu_moeifies_to_the_same_function_and_inner_norms_are_refused():
    import timm

    torch.manual_seed(0)
    m = timm.create_model("eva02_tiny_patch14_224", img_size=28, num_classes=2).eval()
    x = torch.randn(2, 3, 28, 28)
    ref = m(x)
    moeify(m, placement="last_2", num_experts=2, top_k=1, renormalize=True)
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
    scaled = timm.create_model("eva02_tiny_patch14_224", img_size=28, num_classes=2, scale_mlp=True)
    with pytest.raises(ValueError, match="inner norm layer.*scale_mlp=False"):
        moeify(scaled, placement="last_1")


def test_gated_experts_agree_across_kernels_and_the_cpu_default_is_fused():
    from visionmoe.moe.experts import grouped_mm_available

    torch.manual_seed(0)
    x0 = torch.randn(12, 16)
    counts = [5, 0, 7]
    results = {}
    for impl in ["split", "fused"] + (["grouped"] if grouped_mm_available() else []):
        torch.manual_seed(1)
        ex = Experts(3, 16, 16, act_layer=torch.nn.SiLU, gated=True, impl=impl)
        x = x0.clone().requires_grad_(True)
        y = ex(x, counts)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results[impl] = (y, x.grad, ex.fc1_weight.grad)
    y, *_ = results["split"]
    a, b = (x0[:5] @ ex.fc1_weight[0].T + ex.fc1_bias[0]).chunk(2, -1)  # expert 0 by hand: x1 * silu(x2)
    want0 = (a * torch.nn.functional.silu(b)) @ ex.fc2_weight[0].T + ex.fc2_bias[0]
    torch.testing.assert_close(y[:5], want0, rtol=1e-5, atol=1e-5)
    for impl, got in results.items():
        for u, v in zip(results["split"], got):
            torch.testing.assert_close(v, u, rtol=1e-4, atol=1e-5, msg=impl)
    assert Experts(3, 16, 16, gated=True).choose_impl(x0) == "fused"  # one autograd node, less memory
    # the combine too (gate gradients through the fused node), against split
    rows, w = torch.randperm(12)[:10], torch.rand(10)
    outs = {}
    for impl in ("split", "fused"):
        ex.impl = impl
        wi = w.clone().requires_grad_(True)
        y = ex.forward_combined(x0, rows, [4, 0, 6], wi)
        y.pow(2).sum().backward()
        outs[impl] = (y.detach(), wi.grad)
    for u, v in zip(outs["split"], outs["fused"]):
        torch.testing.assert_close(v, u, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ routing groups
@pytest.mark.parametrize("bpr", [True, False])
def test_routing_groups_equal_dispatching_each_group_on_its_own(bpr):
    from visionmoe.moe import SortedDispatcher
    from visionmoe.moe.routers import RouterOutput

    torch.manual_seed(0)
    s, e, k, d, gs = 23, 4, 2, 8, 8  # groups of 8, 8 and 7 units
    logits = torch.randn(s, e)
    probs = logits.softmax(-1)
    w, idx = probs.topk(k, dim=-1)
    route = RouterOutput(indices=idx, weights=w, probs=probs, logits=logits)
    experts = _experts(e=e, d=d)
    x = torch.randn(s, d)
    grouped = SortedDispatcher(capacity_factor=0.6, bpr=bpr, group_size=gs).train()
    y, info = grouped(x, route, experts)
    alone = SortedDispatcher(capacity_factor=0.6, bpr=bpr).train()
    ys, kept = [], []
    for i in range(0, s, gs):
        sl = slice(i, i + gs)
        r = RouterOutput(indices=idx[sl], weights=w[sl], probs=probs[sl], logits=logits[sl])
        yi, ii = alone(x[sl], r, experts)
        ys.append(yi)
        kept.append(ii.kept)
    torch.testing.assert_close(y, torch.cat(ys), rtol=1e-5, atol=1e-6)
    assert torch.equal(info.kept, torch.cat(kept))
    assert info.capacity == math.ceil(k * gs * 0.6 / e)  # C of a full group
    # capacity_multiple_of rounds C up
    assert SortedDispatcher(capacity_factor=0.6, capacity_multiple_of=4).capacity(8, 2, 4) == 4


def test_routing_group_losses_are_the_mean_over_groups():
    torch.manual_seed(0)
    r = LinearRouter(6, 4, k=1, noise_std=0.0, aux_weights={"importance": 1.0, "gshard": 1.0})
    x = torch.randn(12, 6)
    whole = r(x)
    parts = [r(x[:6]), r(x[6:])]
    r.group_size = 6
    grouped = r(x)
    for name in ("importance", "gshard"):
        torch.testing.assert_close(grouped.aux[name], (parts[0].aux[name] + parts[1].aux[name]) / 2)
    assert not torch.allclose(grouped.aux["importance"], whole.aux["importance"])
    layer = build_moe(6, 8, MoEConfig(num_experts=4, group_size=6, capacity_factor=1.0))
    assert layer.router.group_size == 6 and layer.dispatcher.group_size == 6
    with pytest.raises(ValueError, match="moe.group_size must be >= 1"):
        MoEConfig(group_size=0)


def test_expert_choice_in_routing_groups_matches_the_per_expert_loop_per_group():
    """With groups of 6, 6 and 5 units, each expert takes its top ceil(cf * S_g / E) units of
    every group (the hand-written per-expert loop on each group), not of the whole batch."""
    torch.manual_seed(0)
    r = LinearRouter(6, 4, selection="expert_choice", capacity_factor=1.0, aux_weights={})
    r.group_size = 6
    experts = _experts()
    moe = MoE(router=r, experts=experts).train()
    x = torch.randn(17, 6)
    y = moe(x)
    probs = r.proj(x).softmax(-1)
    chosen = torch.cat([_ec_reference(probs[i : i + 6], math.ceil(1.0 * len(probs[i : i + 6]) / 4))
                        for i in range(0, 17, 6)])  # C = 2, 2, 2
    assert not torch.equal(chosen, _ec_reference(probs, math.ceil(17 / 4)))  # the groups matter here
    torch.testing.assert_close(y, _combine_loop(x, chosen, probs, experts), rtol=1e-5, atol=1e-6)
    assert moe.last.kept_counts.tolist() == [6] * 4  # 2 units per expert in each of 3 groups
    layer = build_moe(6, 8, MoEConfig(num_experts=4, selection="expert_choice", group_size=6))
    assert layer.router.group_size == 6


def test_soft_moe_refuses_expert_parallelism_with_the_way_out():
    from visionmoe import create_model
    from visionmoe.moe.parallel import shard_experts

    m = create_model("vmoe_nano_patch4_32", moe={"router": "soft", "num_experts": 4})
    with pytest.raises(ValueError, match="use moe.expert_parallel=1"):
        shard_experts(m, 2)
