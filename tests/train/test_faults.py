"""Bad input and mixed runs: each refused with one line that names the key or the way out, and
nothing the user had is lost."""

import os

import pytest
import yaml

from visionmoe.cli.main import main
from visionmoe.train import ConfigError, RunExistsError, Trainer, config_from_dict
from visionmoe.train.config import apply_overrides

from .test_engine import QUICK

SMALL = {**QUICK, "schedule": {"max_steps": 6, "warmup_epochs": 0.1}, "data": {**QUICK["data"], "augment": "none"},
         "run": {**QUICK["run"], "checkpoint_every": 3}}


@pytest.mark.parametrize("override, key", [
    ("run.log_every=0", "run.log_every"), ("run.checkpoint_every=0", "run.checkpoint_every"),
    ("schedule.max_steps=-3", "schedule.max_steps"), ("schedule.epochs=-1", "schedule.epochs"),
    ("schedule.warmup_epochs=-1", "schedule.warmup_epochs"), ("run.threads=0", "run.threads"),
    ("optim.lr=-0.1", "optim.lr"), ("optim.layer_decay=1.5", "optim.layer_decay"),
    ("run.eval_every_epochs=0", "run.eval_every_epochs"), ("data.batch_size=-2", "data.batch_size"),
    ("run.label_smoothing=1.0", "run.label_smoothing"), ("moe.capacity_factor=abc", "moe.capacity_factor"),
])
def test_values_a_run_cannot_use_are_refused_naming_the_key(override, key, tmp_path, capsys):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(apply_overrides(QUICK, [override]))
    assert main(["train", override, "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert key in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_scientific_notation_is_a_number_in_every_section(tmp_path):
    """YAML 1.1 reads 1e-1 as text; the MoE section converts it like every other."""
    cfg = config_from_dict(apply_overrides(QUICK, ["moe.capacity_factor=1e-1", "moe.aux_weights={load: 1e-2}"]))
    assert cfg.moe["capacity_factor"] == 0.1 and cfg.moe["aux_weights"] == {"load": 0.01}
    path = tmp_path / "c.yaml"
    path.write_text("moe:\n  noise_std: 5e-1\noptim:\n  lr: 3e-4\n")
    from visionmoe.train import load_config

    cfg = load_config(path)
    assert cfg.moe["noise_std"] == 0.5 and cfg.optim.lr == 3e-4


@pytest.mark.parametrize("args, words", [
    ({"embed_dim": 0}, "model.args.embed_dim must be a positive"),
    ({"embed_dim": 30, "num_heads": 4}, "not divisible by num_heads 4"),
    ({"depth": -1}, "model.args.depth"),
])
def test_model_shapes_torch_cannot_build_are_refused(args, words, tmp_path, capsys):
    over = [f"model.args.{k}={v}" for k, v in args.items()]
    assert main(["train", *over, "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def _write(tmp_path, cfg=SMALL):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_new_run_into_an_existing_run_folder_is_refused_and_loses_nothing(tmp_path, capsys):
    cfg, run = _write(tmp_path), tmp_path / "run"
    assert main(["train", str(cfg), "--run-dir", str(run)]) == 0
    ckpts = {p.name: p.read_bytes() for p in (run / "checkpoints").glob("*.safetensors")}
    log = (run / "metrics.jsonl").read_bytes()
    assert len(ckpts) == 2
    capsys.readouterr()
    assert main(["train", str(cfg), "optim.lr=0.01", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").glob("*.safetensors")} == ckpts
    assert (run / "metrics.jsonl").read_bytes() == log
    # the Python API refuses the same way; --overwrite starts over
    with pytest.raises(RunExistsError):
        Trainer(config_from_dict(SMALL), run_dir=run).fit()
    assert main(["train", str(cfg), "optim.lr=0.01", "--run-dir", str(run), "--overwrite"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 0.01


def test_resume_refuses_a_changed_config_unless_allowed(tmp_path, capsys):
    cfg, run = _write(tmp_path), tmp_path / "run"
    Trainer(config_from_dict(SMALL), run_dir=run).fit(stop_after=3)
    capsys.readouterr()
    assert main(["train", str(cfg), "optim.lr=0.01", "--run-dir", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr: 0.003 -> 0.01" in err and "--allow-change optim.lr" in err
    # keys that only change how the run is shown may differ; a named key too
    assert main(["train", str(cfg), "optim.lr=0.01", "run.log_every=1", "--run-dir", str(run), "--resume",
                 "--allow-change", "optim.lr"]) == 0
    assert main(["train", str(cfg), "--run-dir", str(run), "--allow-change", "optim.lr"]) == 2
    assert "--allow-change applies to --resume only" in capsys.readouterr().err


def test_keep_checkpoints_zero_writes_none_and_says_so(tmp_path):
    cfg = config_from_dict(apply_overrides(SMALL, ["run.keep_checkpoints=0"]))
    t = Trainer(cfg, run_dir=tmp_path / "run")
    assert "no checkpoints (run.keep_checkpoints=0)" in t.describe()
    summary = t.fit()
    assert summary["finished"] and not list((tmp_path / "run").rglob("*.safetensors"))


def test_nonfinite_weights_are_never_written_nor_used(tmp_path, capsys):
    import torch

    from visionmoe.data.preprocess import Preprocessing
    from visionmoe.train import TrainingDiverged, save_model

    t = Trainer(config_from_dict(SMALL), run_dir=tmp_path / "run")
    t.fit(stop_after=3)
    good = sorted((tmp_path / "run" / "checkpoints").glob("*.safetensors"))
    with torch.no_grad():
        next(t.model.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="NaN/Inf.*no checkpoint was written"):
        t.save()
    assert sorted((tmp_path / "run" / "checkpoints").glob("*.safetensors")) == good
    # a file that holds them anyway (written by hand) is refused by every command that loads it
    bad = save_model(tmp_path / "bad.safetensors", t.model, preprocessing=Preprocessing(size=8, channels=1))
    capsys.readouterr()
    assert main(["eval", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "NaN/Inf weights" in err and "Traceback" not in err


def test_a_second_trainer_on_a_busy_run_folder_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys):
    import json
    import socket
    import subprocess
    import sys

    run = tmp_path / "run"
    run.mkdir()
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": owner.pid}))
        assert main(["train", str(_write(tmp_path)), "--run-dir", str(run)]) == 2
        err = capsys.readouterr().err
        assert f"in use by process {owner.pid}" in err and "Traceback" not in err
        assert not (run / "checkpoints").exists()
    finally:
        owner.kill()
        owner.wait()
    with pytest.warns(UserWarning, match="stale lock"):  # its process is gone: the lock is taken over
        Trainer(config_from_dict(SMALL), run_dir=run).fit()
    assert not (run / ".lock").exists()  # released at the end


def test_file_system_errors_are_one_line_with_the_path(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["info", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    Trainer(config_from_dict(SMALL), run_dir=tmp_path / "run").fit()
    ck = sorted((tmp_path / "run" / "checkpoints").glob("*.safetensors"))[-1]
    (tmp_path / "out.onnx").mkdir()  # -o names a directory
    assert main(["export", str(ck), "-o", str(tmp_path / "out.onnx")]) == 2
    err = capsys.readouterr().err
    assert "directory" in err.lower() and "out.onnx" in err and "Traceback" not in err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores directory permissions")
def test_an_unwritable_run_folder_is_one_line_with_the_path(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["train", str(_write(tmp_path)), "--run-dir", str(ro / "run")]) == 2
        err = capsys.readouterr().err
        assert "Permission denied" in err and str(ro) in err and "Traceback" not in err
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("override", ["moe.num_experts=[", "moe.num_experts=!!python/object:os.system x",
                                      "optim.lr=*a"])
def test_malformed_overrides_are_one_line(override, tmp_path, capsys):
    assert main(["train", override, "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a valid value" in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_an_alias_bomb_is_refused_without_expanding_it(tmp_path, capsys):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]  # 10^9 values
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\nrun: {name: *a8}\n")
    assert main(["train", str(bomb), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "more than 100,000 values" in err and len(err) < 400
    assert main(["sweep", str(_write(tmp_path)), "--grid", "optim.lr=[0.1,", "--out", str(tmp_path / "s")]) == 2
    assert "grid entry optim.lr" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads every file")
def test_an_unreadable_checkpoint_is_not_called_corrupt_nor_renamed(tmp_path, capsys):
    cfg, run = _write(tmp_path), tmp_path / "run"
    Trainer(config_from_dict(SMALL), run_dir=run).fit(stop_after=3)
    ck = sorted((run / "checkpoints").glob("*.safetensors"))[-1]
    ck.chmod(0o000)
    try:
        assert main(["train", str(cfg), "--run-dir", str(run), "--resume"]) == 2
        err = capsys.readouterr().err
        assert "Permission denied" in err and "corrupt" not in err
        assert ck.exists() and not list((run / "checkpoints").glob("*.corrupt"))
    finally:
        ck.chmod(0o644)


def test_written_files_follow_the_umask(tmp_path):
    from visionmoe._utils import atomic_write_bytes

    old = os.umask(0o022)
    try:
        Trainer(config_from_dict(SMALL), run_dir=tmp_path / "run").fit()
        atomic_write_bytes(tmp_path / "x.json", b"{}")
        ck = sorted((tmp_path / "run" / "checkpoints").glob("*.safetensors"))[-1]
        assert main(["export", str(ck), "-o", str(tmp_path / "m.onnx")]) == 0
    finally:
        os.umask(old)
    files = [*sorted((tmp_path / "run" / "checkpoints").glob("*.safetensors")), tmp_path / "run" / "summary.json",
             tmp_path / "x.json", tmp_path / "m.onnx"]
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in files), [oct(f.stat().st_mode) for f in files]


def test_allow_unverified_is_a_cli_flag_for_files_without_a_checksum(tmp_path, capsys):
    import json as _json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    Trainer(config_from_dict(SMALL), run_dir=tmp_path / "run").fit()
    ck = sorted((tmp_path / "run" / "checkpoints").glob("*.safetensors"))[-1]
    with safe_open(str(ck), framework="pt") as f:
        meta = f.metadata()
    old = _json.loads(meta["visionmoe"]) | {"format": "visionmoe-checkpoint-v1"}
    tensors = {k: v.clone() for k, v in load_file(str(ck)).items()}
    save_file(tensors, str(ck), metadata={"visionmoe": _json.dumps(old)})  # checksum stripped, relabelled v1
    assert main(["info", str(ck)]) == 2
    assert "--allow-unverified" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="loaded unverified"):
        assert main(["--allow-unverified", "info", str(ck)]) == 0


def test_a_full_disk_mid_checkpoint_is_one_line_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    """ENOSPC while the second checkpoint is written: exit 2 with the reason and the path, no
    traceback, no half-written or temporary file left, the first checkpoint intact, and
    ``--resume`` continues from it once there is space."""
    import errno

    import visionmoe.train.checkpoint as ck
    from visionmoe.train import load_trained_model

    real = ck.save_file
    calls = {"n": 0}

    def full_disk(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:
            with open(path, "wb") as f:
                f.write(b"\0" * 100)  # part of the file made it to disk
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", full_disk)
    cfg, run = _write(tmp_path), tmp_path / "run"
    assert main(["train", str(cfg), "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and str(run) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    files = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert files == ["step_00000003.safetensors"], files  # nothing half-written, no temporary file
    load_trained_model(run / "checkpoints" / files[0])
    monkeypatch.setattr(ck, "save_file", real)  # space again
    assert main(["train", str(cfg), "--run-dir", str(run), "--resume"]) == 0
    assert (run / "checkpoints" / "step_00000006.safetensors").is_file()
