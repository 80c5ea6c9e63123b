"""torch.compile and bf16 autocast with MoE layers."""

import pytest
import torch

from visionmoe.models import create_model


def test_bf16_autocast_on_cpu_runs_and_is_close():
    m = create_model("vmoe_nano_patch4_32", num_classes=5, top_k=2).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(x).float().pow(2).mean() + m.moe_aux_loss()
    loss.backward()
    assert m.blocks[1].mlp.experts.fc1_weight.grad is not None


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    m = create_model("vmoe_nano_patch4_32", num_classes=5, top_k=2, depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = m(x)
    compiled = torch.compile(m)
    out = compiled(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    m.train()
    compiled(x).sum().backward()
    assert m.blocks[1].mlp.experts.fc1_weight.grad is not None


def _graph_breaks(model, x):
    from .helpers import explain_training

    return explain_training(model, x).graph_break_count


@pytest.mark.parametrize("moe", [dict(num_experts=4, top_k=1, placement="last_2"),
                                 dict(num_experts=4, top_k=2, placement="last_2", capacity_factor=1.25,
                                      aux_weights={"gshard": 0.01})], ids=["dropless", "capacity-gshard"])
def test_a_training_moe_vit_traces_in_one_graph_under_compile_settings(moe):
    from visionmoe.models import VisionTransformer
    from visionmoe.moe import compile_settings

    torch.manual_seed(0)
    m = VisionTransformer(img_size=28, in_chans=1, num_classes=10, patch_size=7, embed_dim=32, depth=3, num_heads=2,
                          moe=moe).train()
    x = torch.randn(4, 1, 28, 28)
    assert _graph_breaks(m, x) > 0  # plain torch.compile: the per-expert sizes break the graph
    with compile_settings():
        assert _graph_breaks(m, x) == 0


@pytest.mark.slow
@pytest.mark.parametrize("cf", [None, 1.25], ids=["dropless", "capacity"])
def test_fullgraph_compiled_moe_layer_matches_eager_forward_and_backward(cf):
    import copy

    from visionmoe.moe import MoEConfig, build_moe, compile_settings

    torch.manual_seed(0)
    layer = build_moe(16, 32, MoEConfig(num_experts=4, top_k=2, capacity_factor=cf, noise_std=0.0,
                                        aux_weights={"gshard": 0.01})).train()
    ref = copy.deepcopy(layer)
    x = torch.randn(2, 5, 16)
    compiled = torch.compile(layer, fullgraph=True)  # raises on any graph break
    with compile_settings():
        y = compiled(x)
    y.pow(2).sum().backward()
    y_ref = ref(x)
    y_ref.pow(2).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for p, q in zip(layer.parameters(), ref.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_trainer_with_run_compile_trains_a_moe_vit_as_eager(tmp_path):
    """run.compile: true on a MoE model (compiled under compile_settings) logs the eager run's losses."""
    import json

    from visionmoe.data import load_dataset
    from visionmoe.train import Trainer, config_from_dict

    data = load_dataset("digits")
    losses = {}
    for compiled in (False, True):
        cfg = config_from_dict({
            "model": {"name": "vmoe_nano_patch4_32", "args": {"depth": 2, "img_size": 8, "patch_size": 4}},
            "data": {"name": "digits", "augment": "none", "batch_size": 16, "img_size": 8},
            "moe": {"num_experts": 4, "top_k": 1, "noise_std": 0.0},
            "schedule": {"max_steps": 3}, "optim": {"fused": False},
            "run": {"compile": compiled, "progress": False, "log_every": 1, "keep_checkpoints": 0, "device": "cpu",
                    "threads": 1}})
        t = Trainer(cfg, data=data, run_dir=tmp_path / str(compiled))
        t.fit()
        rows = [json.loads(ln) for ln in (t.run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[compiled] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses[True]) == 3
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-5)
