"""Expert parallelism on the CPU: 2 processes (gloo, torchrun) against one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from visionmoe.models import create_model
from visionmoe.moe import MoEConfig, build_moe
from visionmoe.moe.parallel import (
    _GROUPS,
    ExpertShard,
    expert_parallel_groups,
    shard_expert_state,
    shard_experts,
)
from visionmoe.train import Trainer, load_checkpoint, load_trained_model

from .test_distributed import _log, _train  # torchrun / single-process CLI runs and their metrics

HERE = Path(__file__).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

CFG = {
    "model": {"name": "vmoe_nano_patch4_32", "args": {"img_size": 8, "patch_size": 2, "embed_dim": 24, "depth": 2}},
    "moe": {"num_experts": 4, "top_k": 2, "placement": "every_1", "noise_std": 0.0, "aux_weights": {}},
    # 359 test images: rank 0 evaluates 180 (two batches of <= 179), rank 1 179 (one batch),
    # so rank 1 must run an extra forward to keep the all-to-alls in step
    "data": {"name": "digits", "augment": "none", "batch_size": 32, "eval_batch_size": 179},
    "optim": {"lr": 0.003, "clip_grad": 0.5},
    "run": {"progress": False, "log_every": 1, "checkpoint_every": 6, "keep_checkpoints": 3,
            "eval_every_epochs": 0.2, "threads": 1, "ema_decay": 0.9},
    "schedule": {"max_steps": 12, "warmup_epochs": 0.1},
}


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep_worker")
    r = subprocess.run([*TORCHRUN, str(HERE / "_ep_worker.py"), str(out / "res.json"), str(out)], env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "res.json").read_text()), out


def test_expert_parallel_forward_and_backward_equal_one_process(worker):
    ranks, _ = worker
    assert len(ranks) == 2
    for rank in ranks:
        assert set(rank) == {"token_top2_dropless", "token_top1_capacity_bpr", "token_top2_cosine_capacity",
                             "image_cls_top1", "shared_expert", "expert_choice", "loss_free_sigmoid_top2", "vit"}
        for case, res in rank.items():
            assert res["scale"] > 0.05, case  # outputs are not vanishing, so 1e-5 means something
            for what in ("out", "input_grad", "replicated_grad", "expert_grad", "reduced_grad"):
                assert res[what] < 1e-5, (case, what, res[what])


def test_saved_with_two_ranks_loads_in_one_process(worker):
    from safetensors.torch import load_file

    _, out = worker
    torch.manual_seed(0)
    model = create_model("vmoe_nano_patch4_32", img_size=8, patch_size=2, embed_dim=24, depth=2, num_classes=10,
                         in_chans=1, moe={"num_experts": 4, "top_k": 2, "placement": "every_1", "aux_weights": {}})
    sd = load_file(out / "ep_vit.safetensors")
    assert sd["blocks.0.mlp.experts.fc1_weight"].shape == (4, 96, 24)  # full (E, H, D), not a shard
    model.load_state_dict(sd)
    model.eval()
    for rank in range(2):
        saved = torch.load(out / f"ep_logits_rank{rank}.pt", weights_only=True)
        with torch.no_grad():
            torch.testing.assert_close(model(saved["imgs"]), saved["logits"], atol=1e-5, rtol=1e-5)


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in _log(run_dir) if "loss" in r]


def _weights(run_dir: Path, step: int = 12) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / f"step_{step:08d}.safetensors")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ep")
    cfg = root / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    _train(cfg, root / "one", 1)
    _train(cfg, root / "ep", 2, "moe.expert_parallel=2")
    return cfg, root


def test_expert_parallel_training_follows_one_process(runs):
    _, root = runs
    one, ep = _losses(root / "one"), _losses(root / "ep")
    assert [s for s, _ in ep] == list(range(1, 13))
    for (s1, a), (s2, b) in zip(one, ep):
        assert s1 == s2 and a == pytest.approx(b, abs=1e-5), s1
    w1, w2 = _weights(root / "one"), _weights(root / "ep")
    # the checkpoint holds full expert tensors whatever the layout
    assert w2["model"]["blocks.1.mlp.experts.fc2_weight"].shape == (4, 24, 96)
    for part in ("model", "ema"):
        assert _max_diff(w1[part], w2[part]) < 1e-4, part
    m1, m2 = w1["optimizer"]["state"], w2["optimizer"]["state"]
    assert max(float((m1[i]["exp_avg_sq"] - m2[i]["exp_avg_sq"]).abs().max()) for i in m1) < 1e-6
    accs = [[e["test_acc"] for e in _log(root / r) if "test_acc" in e] for r in ("one", "ep")]
    assert len(accs[0]) == len(accs[1]) >= 2 and accs[0] == pytest.approx(accs[1], abs=1e-9)


def test_checkpoints_move_between_layouts(runs, tmp_path):
    cfg, root = runs

    def resume_from(src_run: str, dst: Path, nproc: int, *extra: str) -> Path:
        (dst / "checkpoints").mkdir(parents=True)
        src = root / src_run / "checkpoints" / "step_00000006.safetensors"
        (dst / "checkpoints" / src.name).write_bytes(src.read_bytes())
        _train(cfg, dst, nproc, *extra, "--resume")
        return dst

    full = _weights(root / "one")
    # written by 2 expert-parallel ranks, resumed in one process
    a = resume_from("ep", tmp_path / "ep_to_one", 1)
    assert _max_diff(_weights(a)["model"], full["model"]) < 1e-4
    # written by one process, resumed by 2 expert-parallel ranks (experts and Adam moments cut per rank)
    b = resume_from("one", tmp_path / "one_to_ep", 2, "moe.expert_parallel=2")
    assert _max_diff(_weights(b)["model"], full["model"]) < 1e-4
    model, _, _ = load_trained_model(root / "ep" / "checkpoints" / "step_00000012.safetensors")
    assert model.blocks[0].mlp.experts.shard is None and model.blocks[0].mlp.experts.num_local_experts == 4


def test_expert_parallel_needs_processes(tmp_path):
    cfg = yaml.safe_load(yaml.safe_dump(CFG))
    cfg["moe"]["expert_parallel"] = 2
    with pytest.raises(ValueError, match="torchrun --nproc_per_node=2"):
        Trainer(cfg, run_dir=tmp_path)
    with pytest.raises(ValueError, match="divide moe.num_experts=4"):
        MoEConfig(num_experts=4, expert_parallel=3)
    with pytest.raises(RuntimeError, match="needs torch.distributed"):
        expert_parallel_groups(2)


def test_shard_slices_and_state_round_trip():
    torch.manual_seed(0)
    layer = build_moe(8, 16, MoEConfig(num_experts=4, top_k=1))
    full = {k: v.clone() for k, v in layer.state_dict().items()}
    _GROUPS[-1] = (None, None)  # no collective runs below
    try:
        assert shard_experts(layer, 2, ExpertShard(rank=1, size=2, num_experts=0, key=-1)) == 1
        ex = layer.experts
        assert (ex.shard.start, ex.shard.local, ex.num_local_experts, ex.num_experts) == (2, 2, 2, 4)
        torch.testing.assert_close(ex.fc1_weight, full["experts.fc1_weight"][2:])
        # a full (layout-independent) state dict is cut to this rank's experts, the rest untouched
        cut = shard_expert_state(layer, full)
        assert cut["experts.fc2_bias"].shape == (2, 8)
        torch.testing.assert_close(cut["experts.fc2_weight"], full["experts.fc2_weight"][2:])
        assert cut["router.proj.weight"] is full["router.proj.weight"]
        layer.load_state_dict(cut)
        with pytest.raises(RuntimeError, match="holds experts 2..3 of 4"):
            ex.expert(torch.zeros(1, 8), 0)
    finally:
        del _GROUPS[-1]


def test_groups_are_held_weakly_and_a_destroyed_one_is_named():
    """visionmoe must not keep a process group alive past destroy_process_group (its gloo
    threads would meet the interpreter's teardown and abort the process): _GROUPS holds weak
    references, and a layer whose group is gone says so instead of failing inside torch."""
    import gc
    import weakref

    class Group:  # stands in for a ProcessGroup
        pass

    g = Group()
    _GROUPS[-3] = (weakref.ref(g), None)
    try:
        sh = ExpertShard(rank=0, size=2, num_experts=4, key=-3)
        assert sh.group is g and sh.replica_group is None
        del g
        gc.collect()
        with pytest.raises(RuntimeError, match="process group of these expert-parallel layers was destroyed"):
            _ = sh.group
    finally:
        del _GROUPS[-3]


def test_sharding_replaces_the_experts_module_and_keeps_the_state_dict_keys():
    """Expert parallelism is a module in place of the layer's Experts, not a patch of it: the
    keys of the state dict stay, only the expert tensors' first dimension becomes E / P; the
    other experts of the model are untouched and a second sharding is a no-op."""
    from visionmoe.moe import Experts
    from visionmoe.moe.parallel import ExpertParallel

    torch.manual_seed(0)
    model = torch.nn.Sequential(build_moe(8, 16, MoEConfig(num_experts=4, top_k=1)),
                                build_moe(8, 16, MoEConfig(num_experts=4, top_k=1)))
    before = model.state_dict()
    original = model[0].experts
    _GROUPS[-2] = (None, None)
    try:
        assert shard_experts(model, 4, ExpertShard(rank=3, size=4, num_experts=0, key=-2)) == 2
        assert shard_experts(model, 4, ExpertShard(rank=3, size=4, num_experts=0, key=-2)) == 0
    finally:
        del _GROUPS[-2]
    assert type(original) is Experts and original.fc1_weight.shape[0] == 4  # the old module is not changed
    after = model.state_dict()
    assert list(after) == list(before)
    for layer in model:
        assert isinstance(layer.experts, ExpertParallel) and layer.experts.fuses_combine is False
        assert "holds=3..3" in repr(layer.experts)
    for k, v in after.items():
        want = before[k][3:4] if ".experts." in f".{k}" else before[k]
        torch.testing.assert_close(v, want)
    with pytest.raises(ValueError, match="split over ranks already"):
        ExpertParallel(model[0].experts, model[0].experts.shard)


def test_expert_parallel_benchmark_measures_all_to_all(runs, tmp_path):
    from visionmoe.bench import benchmark_data_parallel

    cfg, _ = runs
    rows = benchmark_data_parallel(str(cfg), nprocs=(1, 2), steps=4, threads=2, out=str(tmp_path),
                                   expert_parallel=True)
    assert [r["expert_parallel"] for r in rows] == [1, 2] and rows[0]["all_to_all_mb_per_rank_per_step"] == 0
    # per rank and MoE layer: 16 images x 17 tokens x top-2 = 544 rows of 24 floats. Forward sends the
    # rows bound for the other rank's experts and returns the outputs of the rows received; backward
    # the same again. At most every row leaves: 2 layers x 2 passes x 2 x 544 x 24 x 4 bytes.
    a2a = rows[1]["all_to_all_mb_per_rank_per_step"]
    assert 0.02 < a2a <= 2 * 2 * 2 * 544 * 24 * 4 / 1e6 + 1e-4
    # the experts are not all-reduced when every rank holds different ones
    assert rows[1]["allreduce_mb_per_rank_per_step"] == pytest.approx(
        4 * (rows[1]["params"] - rows[1]["expert_params"]) / 1e6)
    assert "| 2 | 1 | 2 |" in (tmp_path / "bench_dp.md").read_text()


def test_python_example_runs():
    script = HERE.parents[1] / "examples" / "expert_parallel.py"
    r = subprocess.run([*TORCHRUN, str(script)], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: holds (4, 768, 192), checkpoint has (8, 768, 192)" in r.stdout


def test_four_ranks_two_expert_groups_follow_one_process(runs, tmp_path):
    """4 ranks with moe.expert_parallel=2: two groups of 2 split the experts, and each expert's
    gradient is all-reduced between the 2 ranks that hold it (the replica group)."""
    cfg, root = runs
    _train(cfg, tmp_path / "ep4", 4, "moe.expert_parallel=2")
    for (s1, a), (s2, b) in zip(_losses(root / "one"), _losses(tmp_path / "ep4")):
        assert s1 == s2 and a == pytest.approx(b, abs=1e-5), s1
    assert _max_diff(_weights(root / "one")["model"], _weights(tmp_path / "ep4")["model"]) < 1e-4
