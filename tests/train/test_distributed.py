"""Data parallelism with torchrun on the CPU (gloo, 2 processes) against one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from visionmoe.train import load_checkpoint, load_trained_model
from visionmoe.train.distributed import DistInfo, all_reduce_sums, init_distributed

CFG = {
    "model": {"name": "vmoe_nano_patch4_32", "args": {"img_size": 8, "patch_size": 2, "embed_dim": 24, "depth": 2}},
    "moe": {"num_experts": 4, "top_k": 1, "noise_std": 0.0, "aux_weights": {}},
    "data": {"name": "digits", "augment": "none", "batch_size": 32},
    "optim": {"lr": 0.003},
    "schedule": {"max_steps": 12, "warmup_epochs": 0.1},
    "run": {"progress": False, "log_every": 1, "checkpoint_every": 6, "keep_checkpoints": 3,
            "eval_every_epochs": 1000, "threads": 1},
}


def _train(cfg_path: Path, run_dir: Path, nproc: int, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "visionmoe", "train", str(cfg_path), "--run-dir", str(run_dir), *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    cfg = root / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    _train(cfg, root / "one", 1)
    _train(cfg, root / "two", 2)
    return cfg, root


def test_two_processes_follow_the_single_process_loss_curve(runs):
    _, root = runs
    one, two = _log(root / "one"), _log(root / "two")
    l1 = [(r["step"], r["loss"]) for r in one if "loss" in r]
    l2 = [(r["step"], r["loss"]) for r in two if "loss" in r]
    assert [s for s, _ in l2] == list(range(1, 13))  # rank 0 alone writes: every step once
    for (s1, a), (s2, b) in zip(l1, l2):
        assert s1 == s2 and a == pytest.approx(b, abs=1e-5), s1
    w1 = load_checkpoint(root / "one" / "checkpoints" / "step_00000012.safetensors")["model"]
    w2 = load_checkpoint(root / "two" / "checkpoints" / "step_00000012.safetensors")["model"]
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-4
    # evaluation and routing statistics are reduced over both ranks' halves of the test set
    e1, e2 = one[-1], two[-1]
    assert e1["test_acc"] == pytest.approx(e2["test_acc"], abs=1e-9)
    for name, st in e1["routing"].items():
        assert st["load"] == pytest.approx(e2["routing"][name]["load"], abs=1e-3)


def test_checkpoint_from_two_ranks_resumes_and_loads_on_one(runs, tmp_path):
    cfg, root = runs
    # the 2-rank checkpoint at step 6 continues in a single process to the same result
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    src = root / "two" / "checkpoints" / "step_00000006.safetensors"
    (resumed / "checkpoints" / src.name).write_bytes(src.read_bytes())
    _train(cfg, resumed, 1, "--resume")
    w1 = load_checkpoint(root / "one" / "checkpoints" / "step_00000012.safetensors")["model"]
    w3 = load_checkpoint(resumed / "checkpoints" / "step_00000012.safetensors")["model"]
    assert max(float((w1[k] - w3[k]).abs().max()) for k in w1) < 1e-4
    # and a 2-rank checkpoint gives one process the same outputs as the 2-rank weights
    model, _, _ = load_trained_model(root / "two" / "checkpoints" / "step_00000012.safetensors")
    x = torch.rand(4, 1, 8, 8)
    ref, _, _ = load_trained_model(root / "one" / "checkpoints" / "step_00000012.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-4, rtol=1e-4)


def test_single_process_helpers(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed()
    assert info == DistInfo() and info.is_main and not info.enabled
    assert all_reduce_sums({"a": 2.0}, info) == {"a": 2.0}


def test_data_parallel_benchmark_reports_throughput_and_volume(runs, tmp_path):
    from visionmoe.bench import benchmark_data_parallel

    cfg, _ = runs
    rows = benchmark_data_parallel(str(cfg), nprocs=(1, 2), steps=4, threads=2, out=str(tmp_path))
    assert [r["processes"] for r in rows] == [1, 2] and all(r["img_per_s"] > 0 for r in rows)
    assert rows[0]["allreduce_mb_per_rank_per_step"] == 0
    # ring all-reduce with 2 ranks: each sends 2 * 1/2 of the fp32 gradients
    assert rows[1]["allreduce_mb_per_rank_per_step"] == pytest.approx(4 * rows[1]["params"] / 1e6)
    assert rows[0]["tokens_per_s"] == pytest.approx(rows[0]["img_per_s"] * 17)  # 4x4 patches + CLS
    assert "| 2 | 1 |" in (tmp_path / "bench_dp.md").read_text()
