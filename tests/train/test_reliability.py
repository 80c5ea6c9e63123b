"""Faults: kills, damaged checkpoints, NaN/Inf steps, router collapse, unsafe files and paths."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from visionmoe import create_model
from visionmoe.data import load_dataset
from visionmoe.models import load_state_dict_file
from visionmoe.objectives import ClassificationObjective
from visionmoe.train import (
    CheckpointError,
    ConfigError,
    Trainer,
    TrainingDiverged,
    config_from_dict,
    load_checkpoint,
    load_trained_model,
    save_checkpoint,
    verify_checkpoint,
)
from visionmoe.train.monitor import RoutingMonitor

from .test_engine import QUICK


@pytest.fixture(scope="module")
def digits():
    d = load_dataset("digits")
    d.x_train, d.y_train = d.x_train[:320], d.y_train[:320]
    return d


def _cfg(**run):
    return config_from_dict({**QUICK, "run": {**QUICK["run"], **run}})


# ------------------------------------------------------------------ damaged checkpoints
def _flip_byte(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_tampered_and_truncated_checkpoints_are_refused_naming_the_good_one(tmp_path):
    sd = {"w": torch.arange(64, dtype=torch.float32)}
    good = save_checkpoint(tmp_path / "step_00000001.safetensors", model=sd, state={"step": 1})
    bad = save_checkpoint(tmp_path / "step_00000002.safetensors", model=sd, state={"step": 2})
    assert verify_checkpoint(bad) is None
    _flip_byte(bad)  # one bit pattern in the tensor bytes changes; the file still parses
    with pytest.raises(CheckpointError, match=r"SHA-256.*newest good checkpoint beside it is .*step_00000001"):
        load_checkpoint(bad)
    bad.write_bytes(good.read_bytes()[:-40])  # truncated
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        load_checkpoint(bad)
    assert "truncated" in verify_checkpoint(bad)
    assert load_checkpoint(good)["state"]["step"] == 1


def test_a_stripped_checksum_is_refused_and_old_files_warn(tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_checkpoint(tmp_path / "c.safetensors", model={"w": torch.ones(3)}, state={"step": 1})
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file(tensors, str(path), metadata={"visionmoe": meta["visionmoe"]})  # checksum removed
    with pytest.raises(CheckpointError, match="lost its SHA-256"):
        load_checkpoint(path)
    old = json.loads(meta["visionmoe"]) | {"format": "visionmoe-checkpoint-v1"}  # written before checksums
    save_file(tensors, str(path), metadata={"visionmoe": json.dumps(old)})
    with pytest.raises(CheckpointError, match="no checksum .*--allow-unverified"):  # anyone can declare v1
        load_checkpoint(path)
    from visionmoe.train.checkpoint import allow_unverified_checkpoints

    with allow_unverified_checkpoints(), pytest.warns(UserWarning, match="without a checksum"):
        assert load_checkpoint(path)["state"]["step"] == 1
    with pytest.raises(CheckpointError):  # only inside the block
        load_checkpoint(path)


def test_resume_skips_a_damaged_latest_checkpoint_and_still_matches(tmp_path, digits):
    full = Trainer(_cfg(), run_dir=tmp_path / "full", data=digits)
    full.fit()
    part = Trainer(_cfg(checkpoint_every=2, keep_checkpoints=3), run_dir=tmp_path / "part", data=digits)
    part.fit(stop_after=6)  # checkpoints at 2, 4, 6
    latest = part.checkpoint_dir / "step_00000006.safetensors"
    _flip_byte(latest)
    resumed = Trainer(_cfg(checkpoint_every=2, keep_checkpoints=3), run_dir=tmp_path / "part", data=digits)
    with pytest.warns(UserWarning, match="SHA-256"):
        resumed.fit(resume=True)
    assert (part.checkpoint_dir / "step_00000006.safetensors.corrupt").exists()  # kept, not deleted
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_checkpoint_of_another_architecture_names_the_tensors(tmp_path, digits):
    t = Trainer(_cfg(), run_dir=tmp_path / "a", data=digits)
    t.fit(stop_after=1)
    other = {**QUICK, "model": {**QUICK["model"], "args": {**QUICK["model"]["args"], "embed_dim": 36}}}
    t2 = Trainer(config_from_dict({**other, "run": QUICK["run"]}), run_dir=tmp_path / "b", data=digits)
    with pytest.raises(ValueError, match=r"does not fit this model.*shape mismatch.*cls_token \(1, 1, 24\)"):
        t2.load(t.latest_checkpoint())


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"model": Evil()}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        load_state_dict_file(path)
    cfg = config_from_dict({**QUICK, "model": {**QUICK["model"], "init": str(path)}})
    with pytest.raises(ValueError, match="refusing to load"):
        Trainer(cfg, run_dir=tmp_path / "run", data=load_dataset("digits"))
    assert not marker.exists()
    # a pickle renamed to .safetensors is not read as a checkpoint either
    fake = tmp_path / "step_00000001.safetensors"
    fake.write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError):
        load_checkpoint(fake)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../escape", "a/../../b", "/etc/visionmoe"])
def test_run_names_cannot_leave_the_output_folder(name):
    with pytest.raises(ConfigError, match="run.name"):
        config_from_dict({"run": {"name": name}})
    with pytest.raises(ConfigError, match="run.out_dir"):
        config_from_dict({"run": {"out_dir": "runs/../../x"}})


def test_wrong_image_size_and_channels_are_explained():
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        create_model("vit_nano_patch4_32", img_size=30)
    m = create_model("vit_nano_patch4_32", num_classes=3)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 32, 32\).*adapt"):
        m(torch.zeros(2, 1, 28, 28))


# ------------------------------------------------------------------ numerical faults
class _NaNAt(ClassificationObjective):
    """Classification whose loss is NaN on chosen calls."""

    def __init__(self, bad_calls, **kw):
        super().__init__(10, **kw)
        self.bad_calls, self.calls = set(bad_calls), 0

    def __call__(self, model, batch):
        out = super().__call__(model, batch)
        self.calls += 1
        if self.calls in self.bad_calls:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_nan_loss_and_inf_gradient_steps_are_skipped(tmp_path, digits):
    t = Trainer(_cfg(), run_dir=tmp_path / "nan", data=digits, objective=_NaNAt({3}))
    t.fit(stop_after=2)
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    m = t.train_step(t.batch(t.step))  # call 3: NaN loss
    assert m["skipped"] == 1.0 and t.skipped_steps == 1 and t.step == 3
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, before[k]), k  # no update
    # an Inf gradient with a finite loss is skipped too
    hook = t.model.head.weight.register_hook(lambda g: g * float("inf"))
    m = t.train_step(t.batch(t.step))
    hook.remove()
    assert m["skipped"] == 1.0 and t.skipped_steps == 2
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    m = t.train_step(t.batch(t.step))  # a good step updates again
    assert "skipped" not in m and not torch.equal(t.model.head.weight, before["head.weight"])
    t.save()
    assert load_checkpoint(t.latest_checkpoint())["state"]["skipped_steps"] == 2


def test_too_many_nonfinite_steps_stop_with_a_clear_error(tmp_path, digits):
    t = Trainer(_cfg(max_skipped_steps=2), run_dir=tmp_path / "div", data=digits, objective=_NaNAt(range(100)))
    with pytest.raises(TrainingDiverged, match=r"NaN/Inf in 3 steps \(run.max_skipped_steps=2\)"):
        t.fit()
    log = [json.loads(ln) for ln in (tmp_path / "div" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in log if r.get("skipped_step")] == [1, 2]


# ------------------------------------------------------------------ router collapse
def _collapsed_model():
    m = create_model("vmoe_nano_patch4_32", num_classes=10, in_chans=1, img_size=8, patch_size=2, embed_dim=24,
                     depth=2, moe={"num_experts": 4, "top_k": 1, "noise_std": 0.0, "placement": "all"})
    for _, layer in m.moe_layers():
        torch.nn.init.zeros_(layer.router.proj.weight)  # equal logits: one expert wins every tie
        layer.router.proj.weight.requires_grad_(False)
    return m


def test_routing_monitor_flags_collapse_and_dead_experts_once():
    m = _collapsed_model()
    mon = RoutingMonitor(share=0.9, steps=3, dead_steps=4)
    msgs = []
    for step in range(1, 7):
        m(torch.rand(4, 1, 8, 8))
        msgs += [(step, s) for s in mon.update(m, step)]
    collapse = [s for s in msgs if "router collapse" in s[1]]
    dead = [s for s in msgs if "dead experts" in s[1]]
    assert [s for s, _ in collapse] == [3, 3]  # both MoE layers, at the 3rd step, once
    assert [s for s, _ in dead] == [4, 4]
    for (_, c), (_, d) in zip(collapse, dead):  # the statistics name the expert that took everything
        e = int(c.split("expert ")[1].split()[0])
        assert "100%" in c and f"load {[1.0 if i == e else 0.0 for i in range(4)]}" in c
        assert f"expert(s) {[i for i in range(4) if i != e]} of 4" in d
    # a balanced layer never warns
    balanced = RoutingMonitor(share=0.9, steps=1, dead_steps=1)
    m2 = create_model("vmoe_nano_patch4_32", num_classes=10, in_chans=1, img_size=8, patch_size=2, embed_dim=24,
                      depth=2, moe={"num_experts": 2, "top_k": 2})
    m2(torch.rand(4, 1, 8, 8))
    assert balanced.update(m2, 1) == []


def test_trainer_warns_and_logs_router_collapse(tmp_path, digits):
    cfg = _cfg(collapse_steps=2, dead_expert_steps=0)
    t = Trainer(cfg, run_dir=tmp_path / "col", data=digits, model=_collapsed_model())
    with pytest.warns(RuntimeWarning, match="router collapse in blocks"):
        t.fit(stop_after=3)
    log = [json.loads(ln) for ln in (tmp_path / "col" / "metrics.jsonl").read_text().splitlines()]
    assert sum("warning" in r for r in log) == 2


# ------------------------------------------------------------------ SIGKILL and resume
KILL_CFG = {
    "model": {"name": "vmoe_nano_patch4_32", "args": {"img_size": 8, "patch_size": 2, "embed_dim": 24, "depth": 2}},
    "moe": {"num_experts": 4, "top_k": 1, "noise_std": 1.0},
    "data": {"name": "digits", "augment": "basic", "batch_size": 32},
    "optim": {"lr": 0.003},
    "schedule": {"epochs": 4, "warmup_epochs": 0.5},
    "run": {"progress": False, "log_every": 1, "checkpoint_every": 1, "keep_checkpoints": 2, "eval_every_epochs": 2,
            "deterministic": True, "threads": 1},
}


def _train_cmd(cfg_path: Path, run_dir: Path, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "visionmoe", "train", str(cfg_path), "--run-dir", str(run_dir)]
    return cmd + (["--resume"] if resume else [])


def _final_state(run_dir: Path) -> tuple[dict, list]:
    ck = sorted((run_dir / "checkpoints").glob("step_*.safetensors"))[-1]
    log = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return load_checkpoint(ck)["model"], [(r["step"], r["loss"]) for r in log if "loss" in r]


def _run_with_kills(cfg_path: Path, run_dir: Path, kills: int, rng: random.Random) -> int:
    """Train, SIGKILL-ing the process ``kills`` times at random moments after a checkpoint
    exists, resuming each time; returns how many kills landed mid-run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    landed = 0
    for i in range(kills + 1):
        proc = subprocess.Popen(_train_cmd(cfg_path, run_dir, resume=i > 0), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if i < kills:
            deadline = time.time() + 120
            while proc.poll() is None and time.time() < deadline and not any(
                    (run_dir / "checkpoints").glob("step_*.safetensors")):
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 1.0))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                landed += 1
        _, err = proc.communicate(timeout=300)
        assert proc.returncode in (0, -signal.SIGKILL), err.decode()[-2000:]
    assert proc.returncode == 0
    return landed


def _check_same_as_reference(ref_dir: Path, run_dir: Path) -> None:
    ref_w, ref_log = _final_state(ref_dir)
    w, log = _final_state(run_dir)
    for k, v in ref_w.items():
        assert torch.equal(v, w[k]), k  # bitwise
    assert log == ref_log  # every step logged once, with the same loss: nothing lost or repeated


@pytest.fixture(scope="module")
def kill_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    cfg_path = root / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(KILL_CFG))
    ref = root / "ref"
    subprocess.run(_train_cmd(cfg_path, ref, resume=False), check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return cfg_path, ref


def test_sigkill_at_a_random_step_resumes_to_identical_weights(kill_setup, tmp_path):
    cfg_path, ref = kill_setup
    rng = random.Random(0)
    landed = _run_with_kills(cfg_path, tmp_path / "killed", kills=2, rng=rng)
    assert landed >= 1, "the run finished before it could be killed"
    _check_same_as_reference(ref, tmp_path / "killed")


def test_sigkill_with_two_loader_workers_on_a_streamed_folder_resumes_bitwise(tmp_path):
    """A folder streamed by 2 DataLoader workers with timm's RandomResizedCrop + RandAugment:
    killed twice and resumed, the run ends bitwise equal to an uninterrupted one."""
    from visionmoe.data import make_photo_folder

    photos = make_photo_folder(tmp_path / "photos", per_class=4, val_per_class=1, min_size=40, max_size=64)
    cfg = {**KILL_CFG, "model": {"name": "vmoe_nano_patch4_32", "args": {"embed_dim": 24, "depth": 2}},
           "data": {"name": "image_folder", "args": {"root": str(photos / "train"), "test_root": str(photos / "val")},
                    "augment": "rrc", "auto_augment": "rand-m9-mstd0.5", "batch_size": 8, "workers": 2},
           "schedule": {"epochs": 3, "warmup_epochs": 0.5}}
    cfg["run"] = {**KILL_CFG["run"], "eval_every_epochs": 1, "device": "cpu"}
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    subprocess.run(_train_cmd(cfg_path, tmp_path / "ref", resume=False), check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    landed = _run_with_kills(cfg_path, tmp_path / "killed", kills=2, rng=random.Random(1))
    assert landed >= 1, "the run finished before it could be killed"
    _check_same_as_reference(tmp_path / "ref", tmp_path / "killed")


@pytest.mark.slow
def test_soak_random_kills_for_a_while(kill_setup, tmp_path):
    """Soak: repeated runs killed 1-4 times at random moments, each compared bitwise with the
    uninterrupted run. ``VISIONMOE_SOAK_MINUTES`` (default 30) sets the duration."""
    cfg_path, ref = kill_setup
    budget = float(os.environ.get("VISIONMOE_SOAK_MINUTES", "30")) * 60
    rng, start, runs, kills = random.Random(1), time.time(), 0, 0
    while time.time() - start < budget or runs == 0:
        run_dir = tmp_path / f"soak{runs}"
        kills += _run_with_kills(cfg_path, run_dir, kills=rng.randint(1, 4), rng=rng)
        _check_same_as_reference(ref, run_dir)
        runs += 1
        for f in run_dir.rglob("*"):
            if f.is_file():
                f.unlink()
    print(f"soak: {runs} runs, {kills} kills mid-run, all bitwise equal to the uninterrupted run")
    assert kills >= runs


def test_load_trained_model_rebuilds_without_the_init_file(tmp_path, digits):
    t = Trainer(_cfg(), run_dir=tmp_path / "m", data=digits)
    t.fit(stop_after=2)
    model, cfg, st = load_trained_model(t.latest_checkpoint())
    x = t.test_inputs(4)
    t.model.eval()
    assert torch.equal(model(x), t.model(x))
    assert st.num_classes == 10 and cfg.model.name == QUICK["model"]["name"]
