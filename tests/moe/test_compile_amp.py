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
