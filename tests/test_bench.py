"""Smoke test of `visionmoe bench` (tiny shapes; no timing assertions)."""

import json

import torch

from visionmoe.bench import activation_bytes, run_bench
from visionmoe.moe import Experts, LinearRouter, MoE


def test_quick_bench_writes_json_and_plot(tmp_path):
    res = run_bench(quick=True, peers=False, vit=False, out=tmp_path, progress=False)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.png").stat().st_size > 0
    names = {r["name"] for r in data["suites"]["layer"]}
    assert {"dense", "visionmoe-k1", "visionmoe-k2", "naive-loop-k1", "gshard-einsum-k2", "visionmoe-image-k1"} <= names
    dense = next(r for r in res["suites"]["layer"] if r["name"] == "dense")
    assert dense["fwdbwd_ratio"] == 1.0 and dense["activation_ratio"] == 1.0
    assert all("fwdbwd_ms" in r for r in data["suites"]["layer"] if "error" not in r)


def test_activation_bytes_excludes_parameters_and_counts_saved_tensors():
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(5, 8, requires_grad=True)
    # Linear saves its input (5x8 floats); the weight is a parameter and is not counted
    assert activation_bytes(lambda: lin(x), lin) == 5 * 8 * 4


def test_fused_moe_saves_less_than_dense_mlp():
    from timm.layers import Mlp

    x = torch.randn(4, 16, 32)
    dense = Mlp(32, 128)
    moe = MoE(router=LinearRouter(32, 4, k=1), experts=Experts(4, 32, 128, impl="fused"))
    assert activation_bytes(lambda: moe(x.clone().requires_grad_()), moe) < activation_bytes(
        lambda: dense(x.clone().requires_grad_()), dense)
