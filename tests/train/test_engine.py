import dataclasses
import json
import math

import pytest
import torch

from visionmoe.data import load_dataset
from visionmoe.train import Trainer, build_optimizer, config_from_dict, cosine_lr, load_checkpoint, save_checkpoint

QUICK = {
    "model": {"name": "vmoe_nano_patch4_32", "args": {"img_size": 8, "patch_size": 2, "embed_dim": 24, "depth": 2}},
    "moe": {"num_experts": 4, "top_k": 2, "noise_std": 1.0, "capacity_factor": 1.0},
    "data": {"name": "digits", "augment": "basic", "batch_size": 32},
    "optim": {"lr": 0.003},
    "schedule": {"epochs": 1, "warmup_epochs": 0.2},
    "run": {"progress": False, "log_every": 5, "checkpoint_every": 1000, "eval_every_epochs": 1},
}


@pytest.fixture(scope="module")
def digits():
    d = load_dataset("digits")
    d.x_train, d.y_train = d.x_train[:320], d.y_train[:320]
    return d


def test_cosine_lr_hand_values():
    assert cosine_lr(0, base=1.0, total=10, warmup=2) == 0.5
    assert cosine_lr(1, base=1.0, total=10, warmup=2) == 1.0
    assert cosine_lr(2, base=1.0, total=10, warmup=2) == 1.0
    assert cosine_lr(6, base=1.0, total=10, warmup=2) == pytest.approx(0.5)
    assert cosine_lr(10, base=1.0, total=10, warmup=2, min_lr=0.1) == pytest.approx(0.1)


def test_optimizer_groups_router_lr_and_no_decay():
    cfg = config_from_dict({**QUICK, "optim": {"lr": 0.01, "router_lr_scale": 0.1, "weight_decay": 0.05}})
    t = Trainer(cfg, data=load_dataset("digits"), run_dir="unused")
    opt = build_optimizer(t.model, cfg.optim)
    names = {id(p): n for n, p in t.model.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            n = names[id(p)]
            if ".router." in n:
                assert g["lr_scale"] == pytest.approx(0.1)
            if p.ndim <= 1 or n in ("pos_embed", "cls_token"):
                assert g["weight_decay"] == 0.0, n
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(t.model.parameters()))


def test_fused_optimizer_gives_the_loop_optimizers_update():
    """``optim.fused`` (default) builds torch's fused AdamW; its update equals the
    per-tensor loop's to float rounding, over every parameter group; other optimizers are
    built without the flag."""
    import copy

    cfg = config_from_dict(QUICK)
    t = Trainer(cfg, data=load_dataset("digits"), run_dir="unused")
    models, opts = {}, {}
    for fused in (True, False):
        models[fused] = copy.deepcopy(t.model)
        opts[fused] = build_optimizer(models[fused], dataclasses.replace(cfg.optim, fused=fused))
        torch.manual_seed(0)
        for p in models[fused].parameters():
            p.grad = torch.randn_like(p)
        for _ in range(3):
            opts[fused].step()
    assert all(g["fused"] for g in opts[True].param_groups)
    assert not any(g["fused"] for g in opts[False].param_groups)
    for (n, a), b in zip(models[True].named_parameters(), models[False].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    assert not any(torch.equal(a, b) for a, b in zip(models[True].parameters(), t.model.parameters()) if a.numel() > 4)
    sgd = build_optimizer(t.model, dataclasses.replace(cfg.optim, name="sgd"))
    assert not sgd.defaults.get("fused")


def test_resume_gives_identical_weights(tmp_path, digits):
    full = Trainer(config_from_dict(QUICK), run_dir=tmp_path / "full", data=digits)
    full.fit()
    part = Trainer(config_from_dict(QUICK), run_dir=tmp_path / "part", data=digits)
    part.fit(stop_after=4)  # "killed" after 4 of 10 steps, checkpoint written
    assert part.step == 4
    resumed = Trainer(config_from_dict(QUICK), run_dir=tmp_path / "part", data=digits)
    s = resumed.fit(resume=True)
    assert s["finished"] and resumed.step == full.step == 10
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    # the log of the resumed run has each step once
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(ln)]
    assert steps == sorted(set(steps))


def test_resume_without_checkpoint_is_clear(tmp_path, digits):
    t = Trainer(config_from_dict(QUICK), run_dir=tmp_path / "none", data=digits)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        t.fit(resume=True)


def test_checkpoint_round_trip_and_corruption(tmp_path):
    model = {"w": torch.randn(3, 4)}
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(2))])
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    opt.step()
    p = save_checkpoint(tmp_path / "c.safetensors", model=model, optimizer=opt.state_dict(), state={"step": 7})
    ck = load_checkpoint(p)
    assert torch.equal(ck["model"]["w"], model["w"]) and ck["state"]["step"] == 7
    torch.testing.assert_close(ck["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert not list(tmp_path.glob("*.tmp"))  # no temp files left behind
    data = p.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(tmp_path / "trunc.safetensors")


def test_training_run_beats_chance_and_writes_outputs(tmp_path, digits):
    cfg = config_from_dict({**QUICK, "schedule": {"epochs": 8, "warmup_epochs": 1}, "data": {
        "name": "digits", "augment": "none", "batch_size": 32}, "run": {**QUICK["run"], "ema_decay": 0.9}})
    t = Trainer(cfg, run_dir=tmp_path / "run", data=load_dataset("digits"))
    s = t.fit()
    assert s["test_acc"] > 0.3, s["test_acc"]  # chance 0.1
    assert math.isfinite(s["train_img_per_s"])
    for f in ("config.yaml", "metrics.jsonl", "metrics.csv", "summary.json"):
        assert (tmp_path / "run" / f).exists()
    assert set(s["routing"]) == {"blocks.1", "blocks.3"} or set(s["routing"]) == {"blocks.1"}


def test_routing_keys_flow_from_data_to_cluster_router(tmp_path, digits):
    keys_train = digits.y_train % 3  # any per-image ids: here 3 "clusters"
    d = load_dataset("digits")
    d.x_train, d.y_train = digits.x_train, digits.y_train
    d = d.with_keys(keys_train, d.y_test % 3)
    cfg = config_from_dict({**QUICK, "moe": {"num_experts": 4, "top_k": 1, "routing": "cluster", "num_keys": 3,
                                             "placement": "last_2", "noise_std": 0.0}})  # noise: per image
    t = Trainer(cfg, run_dir=tmp_path, data=d)
    x, y, key = t.batch(0)
    assert torch.equal(key, keys_train[torch.randperm(len(keys_train),
                                                      generator=torch.Generator().manual_seed(0))[:32]])
    t.train_step((x, y, key))
    rec = t.model.routing()[1]
    # every image of one cluster went to the same expert
    for k in range(3):
        assert len(torch.unique(rec.indices[key == k, 0])) <= 1
    res = t.evaluate()
    assert 0.0 <= res["test_acc"] <= 1.0
    with pytest.raises(ValueError, match="one entry per image"):
        d.with_keys(keys_train[:5], d.y_test)


def test_init_from_dense_checkpoint_upcycles_with_shared_expert(tmp_path, digits):
    dense_cfg = {**QUICK, "model": {**QUICK["model"], "dense": True}, "schedule": {"max_steps": 3}}
    t = Trainer(config_from_dict(dense_cfg), run_dir=tmp_path / "dense", data=digits)
    t.fit()
    ckpt = t.latest_checkpoint()
    moe_cfg = {**QUICK, "model": {**QUICK["model"], "init": str(ckpt)},
               "moe": {"num_experts": 4, "top_k": 1, "placement": "all", "shared_expert": True, "noise_std": 0.0}}
    up = Trainer(config_from_dict(moe_cfg), run_dir=tmp_path / "moe", data=digits)
    dense_blocks = t.model.blocks
    for i, blk in enumerate(up.model.blocks):  # every expert and the shared expert start as the dense MLP
        fc1 = dense_blocks[i].mlp.fc1.weight
        assert all(torch.equal(blk.mlp.experts.fc1_weight[e], fc1) for e in range(4))
        assert torch.equal(blk.mlp.shared_expert.fc1.weight, fc1)
    torch.testing.assert_close(up.model.patch_embed.proj.weight, t.model.patch_embed.proj.weight)
    bad = {**moe_cfg, "model": {**moe_cfg["model"], "args": {**QUICK["model"]["args"], "embed_dim": 36}}}
    with pytest.raises((ValueError, RuntimeError), match="size mismatch|does not match"):
        Trainer(config_from_dict(bad), run_dir=tmp_path / "bad", data=digits)


def test_print_eval_switches_the_evaluation_line(tmp_path, digits, capsys):
    for flag in (True, False):
        cfg = config_from_dict({**QUICK, "schedule": {"max_steps": 2}, "run": {**QUICK["run"], "print_eval": flag}})
        Trainer(cfg, run_dir=tmp_path / str(flag), data=digits).fit()
        printed = capsys.readouterr().out
        assert ("step 2: test_acc" in printed) == flag, printed
        assert "test_acc" in (tmp_path / str(flag) / "metrics.jsonl").read_text()  # logged either way
