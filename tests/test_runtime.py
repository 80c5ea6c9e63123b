"""visionmoe.runtime.tune_cpu_allocator: freed big tensors are reused without new page faults.

Each check runs in a child process so that the test process's allocator stays as it was."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from visionmoe.runtime import allocator_state, tune_cpu_allocator


def thp_always() -> bool:
    """The kernel backs every large block with 2 MiB pages: page-fault counts mean little."""
    thp = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return thp.exists() and "[always]" in thp.read_text()


needs_glibc_4k = pytest.mark.skipif(not sys.platform.startswith("linux") or thp_always(),
                                    reason="needs Linux getrusage and 4 KiB pages")

# a 64 MiB tensor made and dropped: twice to warm up, then 4 times counting page faults
_CHILD = """
import json, resource, sys, torch
from visionmoe.runtime import tune_cpu_allocator, allocator_state
from visionmoe.cli.environment import apply_environment
if sys.argv[1] == "tune":  # as the program starts: the environment may turn it off
    apply_environment()
tuned = allocator_state() != "default"
n = 64 * 2**20 // 4
torch.ones(n)
torch.ones(n)
faults = []
for _ in range(4):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(n)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"tuned": tuned, "faults": faults, "state": allocator_state()}))
"""


def _child(mode: str, **env) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("VISIONMOE_MALLOC", "THP_MEM_ALLOC_ENABLE")}
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], env={**e, **env}, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@needs_glibc_4k
def test_tuned_allocator_reuses_freed_64mib_without_page_faults():
    pages = 64 * 2**20 // 4096
    default = _child("plain")
    assert not default["tuned"] and default["state"] == "default"
    # glibc maps a block above 32 MiB afresh each time: every page faults again
    assert min(default["faults"]) >= 0.9 * pages
    tuned = _child("tune")
    assert tuned["tuned"] and "M_MMAP_MAX=0" in tuned["state"]
    # the freed block is reused, already paged in (one call in four may still land on a fresh
    # block when a small allocation has split the old one)
    assert sorted(tuned["faults"])[2] < 0.05 * pages


@needs_glibc_4k
def test_env_turns_the_tuning_off():
    res = _child("tune", VISIONMOE_MALLOC="default")
    assert not res["tuned"] and res["state"] == "default"
    assert min(res["faults"]) >= 0.9 * 64 * 2**20 // 4096


def test_mistyped_env_value_is_named(monkeypatch):
    from visionmoe.cli.environment import apply_environment

    monkeypatch.setenv("VISIONMOE_MALLOC", "defualt")
    with pytest.raises(ValueError, match="VISIONMOE_MALLOC='defualt'.*'default'"):
        apply_environment()
    assert allocator_state() == "default"
    from visionmoe.cli.main import console_main

    assert console_main() == 2  # the program says so instead of a traceback


def test_bad_trim_threshold_is_named():
    with pytest.raises(ValueError, match="trim_threshold"):
        tune_cpu_allocator(trim_threshold=2**40)
    assert allocator_state() == "default"  # nothing was set in this process


def test_the_program_tunes_and_bench_records_it(tmp_path):
    """`python -m visionmoe` (like the `visionmoe` script) applies the setting before the
    command runs; the bench writes it into its config."""
    env = {k: v for k, v in os.environ.items() if k != "VISIONMOE_MALLOC"}
    subprocess.run([sys.executable, "-m", "visionmoe", "bench", "--quick", "--no-peers", "--no-vit", "--no-scaling",
                    "--no-crmoe", "--rounds", "1", "--out", str(tmp_path)], env=env, check=True, timeout=300,
                   capture_output=True)
    cfg = json.loads((tmp_path / "bench.json").read_text())["config"]
    expected = "M_MMAP_MAX=0" if sys.platform.startswith("linux") else "default"
    assert expected in cfg["allocator"]


def test_bench_module_names_a_mistyped_env_value_in_one_line():
    env = {**os.environ, "VISIONMOE_MALLOC": "defualt"}
    res = subprocess.run([sys.executable, "-m", "visionmoe.bench", "--quick"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]  # one line
    assert "VISIONMOE_MALLOC='defualt'" in res.stderr


# ---------------------------------------------------------------------------- run.threads: auto
needs_proc_stat = pytest.mark.skipif(not pathlib.Path("/proc/stat").exists() or not hasattr(os, "sched_getaffinity"),
                                     reason="needs Linux /proc/stat")


def test_threads_for_counts_the_free_cores():
    from visionmoe.runtime import threads_for

    assert threads_for(0.0, cap=2, cores=2) == 2
    assert threads_for(0.1, cap=2, cores=2) == 2  # a nearly idle machine keeps every core
    assert threads_for(0.5, cap=2, cores=2) == 1  # half a core taken: its thread would wait at every op
    assert threads_for(1.0, cap=2, cores=2) == 1
    assert threads_for(3.0, cap=8, cores=8) == 5
    assert threads_for(9.0, cap=8, cores=8) == 1  # never fewer than one
    assert threads_for(0.0, cap=4, cores=16) == 4  # never more than the cap


def test_others_busy_cores_subtracts_the_process_own_time():
    from visionmoe.runtime import others_busy_cores

    # 2 s of wall time: the cores were busy 3.0 s in all, 1.2 s of it this process's
    assert others_busy_cores((10.0, 5.0, 100.0), (13.0, 6.2, 102.0)) == pytest.approx(0.9)
    assert others_busy_cores((10.0, 5.0, 100.0), (10.5, 5.6, 101.0)) == 0.0  # clock granularity: not negative


@needs_proc_stat
def test_the_governor_leaves_cores_that_other_processes_keep_busy():
    import time

    import torch

    from visionmoe import runtime
    from visionmoe.bench.run import background_load, stop_load

    cores = len(os.sched_getaffinity(0))
    busy = background_load(cores)  # not this process's children: another program's load
    before = torch.get_num_threads()
    try:
        time.sleep(0.5)
        runtime._recent = None
        gov = runtime.ThreadGovernor(cap=cores, window=0.5)
        assert gov.start() == 1, gov.changes  # every core is taken by another process
        assert torch.get_num_threads() == 1
        assert gov.changes[0][0] >= cores - 0.7
    finally:
        stop_load(busy)
        gov.stop()
    assert torch.get_num_threads() == before


def _train_with_every_core_busy(train) -> tuple[list[int], int]:
    """``train(model, x, y)`` on a tiny model while one busy process per core runs beside it;
    returns the thread counts its forward passes saw and torch's count before it."""
    import time

    import torch
    from torch import nn

    from visionmoe import runtime
    from visionmoe.bench.run import background_load, stop_load

    seen: list[int] = []
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    x, y = torch.randn(32, 1, 4, 4), torch.arange(32) % 3
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(min(2, cores))
    before = torch.get_num_threads()
    busy = background_load(cores)  # not this process's children: another program's load
    try:
        time.sleep(0.5)
        runtime._recent = None  # no earlier measurement of this process: measure anew
        train(model, x, y)
    finally:
        stop_load(busy)
    return seen, before


@needs_proc_stat
def test_training_under_load_runs_on_the_free_cores_and_puts_torchs_count_back():
    """``run.threads: auto`` (the default) through the real Trainer: with every core taken by
    another process, the steps run on one thread; afterwards torch has its count again."""
    import torch

    from visionmoe.train import train_classifier

    seen, before = _train_with_every_core_busy(
        lambda model, x, y: train_classifier(model, x, y, epochs=2, batch_size=8, progress=False))
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == before


@needs_proc_stat
def test_deterministic_runs_keep_torchs_thread_count_under_load(tmp_path):
    """Exact resume must not depend on the load: with run.deterministic the count stays torch's."""
    from visionmoe.data import TensorSplits
    from visionmoe.train import Trainer, config_from_dict

    cfg = config_from_dict({"data": {"name": "tensors", "augment": "none", "batch_size": 8},
                            "schedule": {"max_steps": 4}, "run": {"deterministic": True, "progress": False,
                                                                  "keep_checkpoints": 0, "device": "cpu"}})

    def train(model, x, y):
        data = TensorSplits("t", x, y, x[:8], y[:8], ["a", "b", "c"])
        Trainer(cfg, data=data, model=model, run_dir=tmp_path / "run").fit()

    seen, before = _train_with_every_core_busy(train)
    assert seen and set(seen) == {before}


@needs_proc_stat
def test_the_process_children_count_as_its_own_work():
    """Data-loader workers are the run's own load: a busy child does not make auto drop threads."""
    import time

    from visionmoe.runtime import cpu_snapshot, others_busy_cores

    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        a = cpu_snapshot()
        time.sleep(1.0)
        b = cpu_snapshot()
        assert b[1] - a[1] > 0.5  # the child's CPU time is in this process's own time
        assert others_busy_cores(a, b) < 0.5
    finally:
        child.kill()
        child.wait()
