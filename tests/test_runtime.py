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
