"""Checks that need CUDA: skipped without it; ``scripts/gpu_check.sh`` runs them on a GPU machine."""

import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from visionmoe.data import load_dataset  # noqa: E402
from visionmoe.moe import Experts  # noqa: E402
from visionmoe.train import Trainer, config_from_dict, load_trained_model  # noqa: E402

CFG = {"model": {"name": "vmoe_nano_patch4_32", "args": {"img_size": 8, "patch_size": 2, "embed_dim": 32, "depth": 2}},
       "moe": {"num_experts": 4, "top_k": 2, "noise_std": 1.0, "capacity_factor": 1.0},
       "data": {"name": "digits", "augment": "basic", "batch_size": 32},
       "schedule": {"max_steps": 20, "warmup_epochs": 0.2},
       "run": {"progress": False, "eval_every_epochs": 100, "checkpoint_every": 10, "device": "cuda"}}


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_training_runs_on_the_gpu_with_every_precision(tmp_path, amp):
    t = Trainer(config_from_dict({**CFG, "run": {**CFG["run"], "amp": amp}}), run_dir=tmp_path)
    s = t.fit()
    assert s["device"].startswith("cuda") and s["finished"] and s["skipped_steps"] <= 2
    assert all(p.device.type == "cuda" for p in t.model.parameters())
    assert all(v.device.type == "cuda" for st in t.optimizer.state.values() for v in st.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)
    model, _, st = load_trained_model(t.latest_checkpoint())  # loads on the CPU
    assert next(model.parameters()).device.type == "cpu" and st.step == 20


def test_gpu_resume_is_bitwise_equal(tmp_path):
    whole = Trainer(config_from_dict(CFG), run_dir=tmp_path / "w")
    whole.fit()
    part = Trainer(config_from_dict(CFG), run_dir=tmp_path / "p")
    part.fit(stop_after=10)
    res = Trainer(config_from_dict(CFG), run_dir=tmp_path / "p")
    res.fit(resume=True)
    a, b = whole.model.state_dict(), res.model.state_dict()
    # CUDA kernels (atomics in index_add / scatter backward) may not be deterministic: compare closely
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.parametrize("impl", ["grouped", "split"])
def test_grouped_kernel_equals_split_kernel_on_cuda(impl):
    torch.manual_seed(0)
    ex = Experts(8, 64, 256, impl=impl).cuda()
    ref = Experts(8, 64, 256, impl="split").cuda()
    ref.load_state_dict(ex.state_dict())
    x = torch.randn(300, 64, device="cuda", requires_grad=True)
    counts = torch.tensor([40, 0, 60, 30, 50, 20, 70, 30])
    rows = torch.randperm(300, device="cuda")
    y = ex.forward_gathered(x, rows, counts)
    y_ref = ref.forward_gathered(x, rows, counts)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    y.sum().backward()
    g = ex.fc1_weight.grad.clone()
    ref.forward_gathered(x, rows, counts).sum().backward()
    torch.testing.assert_close(g, ref.fc1_weight.grad, atol=1e-3, rtol=1e-3)


def test_eval_and_checkpoint_device_independent(tmp_path):
    d = load_dataset("digits")
    t = Trainer(config_from_dict(CFG), run_dir=tmp_path, data=d)
    t.fit()
    gpu = t.evaluate()
    cpu_t = Trainer(config_from_dict({**CFG, "run": {**CFG["run"], "device": "cpu"}}), run_dir=tmp_path / "c", data=d)
    cpu_t.load(t.latest_checkpoint())
    cpu = cpu_t.evaluate()
    assert abs(gpu["test_acc"] - cpu["test_acc"]) < 0.02


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_process_nccl_run(tmp_path):
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "visionmoe", "train", str(cfg), "--run-dir", str(tmp_path / "r")],
                       capture_output=True, text=True, env={**os.environ}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "r" / "summary.json").exists()
