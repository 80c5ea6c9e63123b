"""ViT: timm keys and outputs, checkpoint layouts, registry, MoE API, upcycle/extract."""

import pytest
import timm
import torch
from safetensors.torch import save_file

import visionmoe
from visionmoe.models import (
    VisionTransformer,
    count_parameters,
    create_model,
    detect_layout,
    list_models,
    load_dense_into_moe,
    load_state_dict_file,
    model_args,
    to_timm,
)

SMALL = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=5)


def _timm_vit(**kw):
    args = {**SMALL, **kw}
    return timm.models.vision_transformer.VisionTransformer(**args).eval()


def _max_diff(a, b):
    return (a - b).abs().max().item()


def test_timm_checkpoint_loads_as_is(tmp_path):
    ref = _timm_vit()
    path = tmp_path / "vit.safetensors"
    save_file(ref.state_dict(), str(path))
    ours = VisionTransformer(**SMALL).eval()
    assert set(ours.state_dict()) == set(ref.state_dict())  # identical keys
    ours.load_state_dict(load_state_dict_file(path))
    x = torch.randn(2, 3, 32, 32)
    assert _max_diff(ours(x), ref(x)) < 1e-5


@pytest.mark.parametrize("kw", [dict(reg_tokens=4, no_embed_class=True, init_values=1e-5), dict(global_pool="avg")])
def test_timm_variants_load(kw):
    ref = _timm_vit(**kw)
    ours = VisionTransformer(**SMALL, **kw).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert _max_diff(ours(x), ref(x)) < 1e-5


def test_mae_layout_loads_through_key_mapping(tmp_path):
    ref = _timm_vit()
    sd = dict(ref.state_dict())
    # MAE checkpoints hold {"model": encoder + decoder_* + mask_token}
    ckpt = {"model": {**sd, "mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.zeros(32, 48),
                      "decoder_blocks.0.norm1.weight": torch.ones(32), "decoder_pred.bias": torch.zeros(4)}}
    path = tmp_path / "mae.pth"
    torch.save(ckpt, path)
    assert detect_layout(ckpt) == "mae"
    ours = VisionTransformer(**SMALL).eval()
    ours.load_state_dict(to_timm(load_state_dict_file(path)))
    x = torch.randn(2, 3, 32, 32)
    assert _max_diff(ours(x), ref(x)) < 1e-5


def test_mocov3_layout_loads_through_key_mapping():
    ref = _timm_vit()
    sd = ref.state_dict()
    ckpt = {"state_dict": {**{f"module.base_encoder.{k}": v for k, v in sd.items() if not k.startswith("head.")},
                           "module.base_encoder.head.0.weight": torch.zeros(4, 48),
                           **{f"module.momentum_encoder.{k}": v for k, v in sd.items()},
                           "module.predictor.0.weight": torch.zeros(4, 4)}}
    assert detect_layout(ckpt) == "mocov3"
    mapped = to_timm(ckpt)
    assert not any(k.startswith("head.") for k in mapped)
    ours = VisionTransformer(**SMALL).eval()
    missing, unexpected = ours.load_state_dict(mapped, strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and not unexpected
    ours.head.load_state_dict(ref.head.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert _max_diff(ours(x), ref(x)) < 1e-5


def test_dinov2_layout_with_registers_loads_through_key_mapping():
    kw = dict(reg_tokens=4, no_embed_class=True, init_values=1e-5)
    ref = _timm_vit(**kw)
    sd = ref.state_dict()
    # DINOv2 layout: register_tokens, pos_embed with the cls position, mask_token
    pos_cls = torch.randn(1, 1, 48)
    dino = {k: v for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    dino.update(register_tokens=sd["reg_token"], cls_token=sd["cls_token"] - pos_cls,
                pos_embed=torch.cat([pos_cls, sd["pos_embed"]], 1), mask_token=torch.zeros(1, 48))
    assert detect_layout(dino) == "dinov2"
    ours = VisionTransformer(**SMALL, **kw).eval()
    ours.load_state_dict(to_timm(dino))
    x = torch.randn(2, 3, 32, 32)
    assert _max_diff(ours(x), ref(x)) < 1e-5


def test_malicious_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        load_state_dict_file(path)


def test_upcycled_model_equals_dense_and_checks_keys():
    ref = _timm_vit()
    moe = VisionTransformer(**SMALL, moe=dict(num_experts=4, top_k=2, renormalize=True, placement="every_2")).eval()
    load_dense_into_moe(moe, ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert _max_diff(moe(x), ref(x)) < 1e-5
    bad = dict(ref.state_dict())
    bad.pop("norm.weight")
    with pytest.raises(ValueError, match="norm.weight"):
        load_dense_into_moe(moe, bad)


def test_extracted_dense_equals_moe_for_cluster_routing():
    cfg = dict(num_experts=4, top_k=1, routing="cluster", num_keys=6, placement="last_2")
    moe = VisionTransformer(**SMALL, moe=cfg).eval()
    for _, layer in moe.moe_layers():  # make experts differ
        torch.nn.init.normal_(layer.experts.fc1_weight, std=0.2)
        torch.nn.init.normal_(layer.router.proj.weight, std=1.0)
    x = torch.randn(3, 3, 32, 32)
    for cluster in range(6):
        dense = moe.extract_dense(key=cluster).eval()
        assert not dense.is_moe and isinstance(dense, VisionTransformer)
        key = torch.full((3,), cluster)
        assert _max_diff(dense(x), moe(x, routing_key=key)) < 1e-5
        # the extracted model is a plain timm ViT
        plain = _timm_vit()
        plain.load_state_dict(dense.state_dict())
        assert _max_diff(plain(x), dense(x)) < 1e-5


def test_extracted_dense_equals_moe_for_cls_routing_k1():
    moe = VisionTransformer(**SMALL, moe=dict(num_experts=3, top_k=1, routing="cls", placement="last_2")).eval()
    for _, layer in moe.moe_layers():
        torch.nn.init.normal_(layer.experts.fc1_weight, std=0.2)
    x = torch.randn(4, 3, 32, 32)
    moe(x)
    rec = moe.routing()
    for b in range(4):
        sel = {i: (int(r.indices[b, 0]), float(r.weights[b, 0])) for i, r in rec.items()}
        dense = moe.extract_dense(selection=sel).eval()
        assert _max_diff(dense(x[b:b + 1]), moe(x[b:b + 1])) < 1e-5


def test_moe_api_and_param_counts():
    m = create_model("vmoe_nano_patch4_32", num_classes=10, num_experts=4, top_k=2)
    assert m.moe_blocks == [1, 3] and m.is_moe
    y = m(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10)
    stats = m.routing_stats()
    assert set(stats) == {"blocks.1", "blocks.3"}
    assert m.moe_aux_loss().requires_grad
    c = count_parameters(m)
    per_expert = sum(p[0].numel() for p in m.blocks[1].mlp.experts.parameters())
    assert c["total"] - c["active"] == 2 * (4 - 2) * per_expert
    # expert choice: a token gets capacity_factor experts on average (1.5 of 4 here)
    ec = create_model("vmoe_nano_patch4_32", num_classes=10, moe={"num_experts": 4, "selection": "expert_choice",
                                                                  "capacity_factor": 1.5})
    c = count_parameters(ec)
    assert c["total"] - c["active"] == 2 * (4 - 1.5) * per_expert


def test_registry_errors_and_overrides():
    with pytest.raises(ValueError, match="Did you mean 'vmoe_tiny_patch4_32'"):
        create_model("vmoe_tiny_patch4_23")
    with pytest.raises(ValueError, match="Did you mean 'num_classes'"):
        create_model("vit_nano_patch4_32", num_clases=3)
    with pytest.raises(ValueError, match="top_k"):
        create_model("vmoe_nano_patch4_32", top_k=9)
    dense = create_model("vmoe_nano_patch4_32", moe=None)
    assert not dense.is_moe
    m = create_model("vmoe_nano_patch4_32", moe={"placement": "last_2"})
    assert m.moe_blocks == [2, 3] and m.moe_config.num_experts == 4


@pytest.mark.parametrize("name", [n for n in list_models() if not n.startswith("convnext")])
def test_every_registered_variant_builds(name):
    args = model_args(name)
    if args["img_size"] <= 32:
        m = create_model(name, num_classes=3).eval()
        keyed = args.get("moe", {}).get("routing") in ("cluster", "task")
        key = torch.tensor([0]) if keyed else None
        x = torch.randn(1, args.get("in_chans", 3), args["img_size"], args["img_size"])
        assert m(x, routing_key=key).shape == (1, 3)
    else:  # full-size variants: build on the meta device (no memory), check the structure
        with torch.device("meta"):
            m = create_model(name)
        assert len(m.blocks) == args["depth"]
    moe = args.get("moe")
    if moe:
        assert m.is_moe and len(m.moe_layers()) == len(m.moe_blocks) > 0
        assert m.moe_config.num_experts == moe["num_experts"]


def test_public_api():
    assert "vmoe_tiny_patch4_32" in visionmoe.list_models()
    assert callable(visionmoe.moeify)


@pytest.mark.parametrize("name", list_models("convnext*"))
def test_convnext_variants_build_and_place_experts(name):
    from visionmoe.moe import moe_layers

    args = model_args(name)
    small = "cpu" in name
    with torch.device("cpu" if small else "meta"):
        m = create_model(name, num_classes=3, in_chans=1)
    if small:
        assert m(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    n_blocks = sum(args["depths"])
    layers = list(moe_layers(m))
    if args.get("moe"):
        expected = {"every_2": n_blocks // 2, "last_2": 2}[args["moe"]["placement"]]
        assert len(layers) == expected
    else:
        assert not layers


def test_convnext_stage_placement_and_gates():
    from visionmoe.moe import moe_layers

    m = create_model("convnext_moe_cpu", num_classes=3, in_chans=1, placement="stage_2", router="l2", top_k=2)
    names = [n for n, _ in moe_layers(m)]
    assert names and all(n.startswith("stages.2.") for n in names) and len(names) == 2
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    with pytest.raises(ValueError, match="no MLP blocks in stage 7"):
        create_model("convnext_moe_cpu", placement="stage_7")


def test_convnext_sweet_spot_placements_and_parameter_counts():
    """Sweet spot Table 3 / 5: ConvNeXt-T-8 with ratio-2 experts, "Last 2" (the last block of
    each of the last two stages) 46.3M parameters, "Stage" (the last block of every stage) 47.4M."""
    from visionmoe.moe import moe_layers

    counts = {}
    for placement in ("last_2", "stage"):
        with torch.device("meta"):
            m = create_model("convnext_tiny", num_classes=1000,
                             moe=dict(placement=placement, num_experts=8, top_k=1, expert_ratio=2.0))
        counts[placement] = sum(p.numel() for p in m.parameters()) / 1e6
        names = [n for n, _ in moe_layers(m)]
        want = {"last_2": ["stages.2.blocks.8.mlp", "stages.3.blocks.2.mlp"],
                "stage": ["stages.0.blocks.2.mlp", "stages.1.blocks.2.mlp", "stages.2.blocks.8.mlp",
                          "stages.3.blocks.2.mlp"]}[placement]
        assert names == want
        assert all(layer.experts.hidden == 2 * layer.dim for _, layer in moe_layers(m))
    assert round(counts["last_2"], 1) == 46.3 and round(counts["stage"], 1) == 47.4
    with pytest.raises(ValueError, match="this model has 4 stages"):
        create_model("convnext_cpu", moe=dict(placement="last_5"))


def test_fine_grained_convnext_keeps_the_dense_active_width_in_every_stage():
    """Fine-grained experts (expert_ratio 1: a quarter of the 4x MLP) with top-3 and a shared
    expert of ratio 1 act on 3D + D = 4D hidden units per token in every stage, whatever its
    width D: the dense MLP's. The per-stage widths are hand-set (32-256 in the CPU ConvNeXt)."""
    from visionmoe.moe import moe_layers

    m = create_model("convnext_moe_cpu", num_classes=10,
                     moe=dict(placement="every_2", num_experts=32, top_k=3, expert_ratio=1.0,
                              shared_expert=True, shared_ratio=1.0))
    layers = moe_layers(m)
    assert [layer.dim for _, layer in layers] == [32, 64, 128, 256]
    for _, layer in layers:
        assert layer.experts.hidden == layer.dim
        assert layer.shared_expert.fc1.out_features == layer.dim
        assert layer.experts.hidden * 3 + layer.shared_expert.fc1.out_features == 4 * layer.dim
    with pytest.raises(ValueError, match="moe.shared_ratio must be > 0"):
        create_model("convnext_moe_cpu", moe=dict(shared_expert=True, shared_ratio=0.0))
