"""The compiled CPU expert loop (visionmoe.moe.native, csrc/experts_cpu.cpp): same results
as the serial loop, used when the switch and the experts' size
say so, clear errors."""

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import visionmoe.moe.experts as ex
from visionmoe.moe import Experts, native


@pytest.fixture(scope="module")
def module():
    """The compiled loop, built here if `make setup` did not (about 40 s); skipped only where
    no C++ compiler or ninja is found."""
    if not native.built():
        if native._which("c++") is None or native._which("ninja") is None:
            pytest.skip("no C++ compiler or ninja here: the compiled expert loop cannot be built")
        native.build()
    mod = native.load()
    assert mod is not None
    return mod


@pytest.fixture
def two_threads(monkeypatch):
    monkeypatch.setattr(ex, "MIN_THREADED_WORK", 0)
    monkeypatch.setattr(native, "_MODE", "auto")
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


class _Spy:
    """The compiled module, counting its calls."""

    def __init__(self, mod):
        self.mod, self.calls = mod, []

    def __getattr__(self, name):
        fn = getattr(self.mod, name)

        def call(*args):
            self.calls.append(name)
            return fn(*args)

        return call


@pytest.mark.parametrize("recompute, bias, approximate, combined, unit", [
    *itertools.product([False, True], [True, False], ["none", "tanh"], [True], [1, 5]),
    (False, True, "none", False, 1), (True, False, "tanh", False, 1),
])
def test_compiled_loop_matches_the_serial_loop(module, two_threads, monkeypatch, recompute, bias,
                                                         approximate, combined, unit):
    """Outputs and every gradient (input, combine weights, weights, biases) of the compiled
    loop equal the serial loop's, with an expert that gets no rows
    (zero gradients), whole images (unit = 5), recomputed activations, tanh GELU, no bias;
    and the compiled loop really ran (forward and backward)."""
    spy = _Spy(module)
    monkeypatch.setattr(native, "load", lambda: spy)
    D, H, units = 8, 16, 40
    torch.manual_seed(0)
    x0, rows, w0 = torch.randn(units * unit, D), torch.randperm(units)[:30], torch.rand(30)
    counts = [c * unit for c in (10, 12, 0, 8)]
    res = {}
    for mode in ("native", False):
        e = Experts(4, D, H, impl="fused", recompute=recompute, bias=bias,
                    act_layer=torch.nn.GELU(approximate=approximate), threads=mode)
        torch.manual_seed(1)
        e.reset_parameters()
        if bias:
            with torch.no_grad():
                e.fc1_bias.normal_()
                e.fc2_bias.normal_()
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        if combined:
            y = e.forward_combined(x, rows, counts, w, unique=True, unit=unit)
        else:
            y = e.forward_gathered(x, rows, counts)
        y.pow(2).sum().backward()
        res[mode] = [y, x.grad, w.grad, *[p.grad for p in e.parameters()]]
        if mode == "native":
            assert spy.calls == ["experts_forward", "experts_backward"]
    for a, b in zip(res["native"], res[False]):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(res["native"][3][2], torch.zeros(H, D))  # expert 2 had no rows


def test_threads_true_picks_the_loop_by_expert_size_and_the_switch_overrides(module, two_threads, monkeypatch):
    """threads=True layers run in the compiled loop when their experts with rows average at
    least MIN_ROWS rows (the default mode, auto), serially below that; mode 1
    always, 0 never (same numbers every way); another value is refused with the settings
    named. The program takes the mode from VISIONMOE_NATIVE (test_build_native_command_*)."""
    spy = _Spy(module)
    monkeypatch.setattr(native, "load", lambda: spy)
    monkeypatch.setattr(native, "MIN_ROWS", 10)
    e = Experts(3, 8, 16, impl="fused")
    torch.manual_seed(0)
    x = torch.randn(20, 8)
    big, small = (torch.randperm(20), [8, 0, 12]), (torch.randperm(20)[:19], [7, 0, 12])  # means 10 and 9.5
    ref = {k: Experts(3, 8, 16, impl="fused", threads=False) for k in ("big", "small")}
    for r in ref.values():
        r.load_state_dict(e.state_dict())

    def calls(case, rows, counts):
        spy.calls.clear()
        torch.testing.assert_close(e.forward_gathered(x, rows, counts), ref[case].forward_gathered(x, rows, counts),
                                   rtol=1e-5, atol=1e-6)
        return list(spy.calls)

    for env, want_big, want_small, word in (("", True, False, "built, auto"), ("auto", True, False, "built, auto"),
                                            ("1", True, True, "on (native mode 1)"),
                                            ("0", False, False, "built, off (native mode 0)")):
        native.set_mode(env)
        assert native.mode() == (env or "auto")
        assert calls("big", *big) == (["experts_forward"] if want_big else []), env
        assert calls("small", *small) == (["experts_forward"] if want_small else []), env
        assert native.status().startswith(word)
    with pytest.raises(ValueError, match="native mode='yes'.*use auto"):
        native.set_mode("yes")
    assert native.mode() == "0"  # a refused value changes nothing


def test_compiled_loop_keeps_grad_and_inference_modes(module, two_threads):
    """Under no_grad and inference_mode (parameters still requiring grad) the compiled loop,
    whose second group runs on an OpenMP worker, gives the serial loop's outputs."""
    e, s = Experts(4, 8, 16, impl="fused", threads="native"), Experts(4, 8, 16, impl="fused", threads=False)
    s.load_state_dict(e.state_dict())
    x, rows, counts = torch.randn(40, 8), torch.randperm(40), [10, 12, 0, 18]
    ref = s.forward_gathered(x, rows, counts).detach()
    with torch.no_grad():
        torch.testing.assert_close(e.forward_gathered(x, rows, counts), ref, rtol=1e-5, atol=1e-6)
    with torch.inference_mode():
        torch.testing.assert_close(e.forward_gathered(x, rows, counts), ref, rtol=1e-5, atol=1e-6)


def test_native_mode_without_the_build_is_a_clear_error(two_threads, monkeypatch):
    monkeypatch.setattr(native, "load", lambda: None)
    e = Experts(2, 8, 16, impl="fused", threads="native")
    with pytest.raises(RuntimeError, match="compiled expert loop"):
        e.forward_gathered(torch.randn(20, 8), torch.randperm(20), [8, 12])
    with pytest.raises(ValueError, match="threads must be one of"):
        Experts(2, 8, 16, threads="fast")


def test_build_without_tools_names_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_CACHE_ROOT", tmp_path)
    monkeypatch.setattr(native, "_which", lambda tool: None if tool == "ninja" else "/usr/bin/" + tool)
    with pytest.raises(RuntimeError, match="needs ninja on PATH"):
        native.build()
    assert not any(tmp_path.iterdir())  # nothing half-made left behind


def test_compiled_loop_checks_its_plan(module):
    """A plan that does not cover the rows or lists an unknown expert is refused, not run."""
    xs, w1, w2 = torch.randn(10, 4), torch.randn(2, 6, 4), torch.randn(2, 4, 6)
    h, ys = torch.empty(10, 6), torch.empty(10, 4)
    args = (xs, w1, None, w2, None, h, None, torch.empty(10, 6), ys)
    with pytest.raises(RuntimeError, match="starts must run from 0 to the row count"):
        module.experts_forward(*args, [0, 4, 9], [0, 1], [0, 1, 2], "none")
    with pytest.raises(RuntimeError, match="out of range"):
        module.experts_forward(*args, [0, 4, 10], [0, 5], [0, 1, 2], "none")
    module.experts_forward(*args, [0, 4, 10], [1, 0], [0, 1, 2], "none")
    ref = torch.cat([torch.nn.functional.gelu(xs[:4] @ w1[0].T) @ w2[0].T,
                     torch.nn.functional.gelu(xs[4:] @ w1[1].T) @ w2[1].T])
    torch.testing.assert_close(ys, ref, rtol=1e-5, atol=1e-5)


def test_build_native_command_reports_status(module):
    env = {k: v for k, v in os.environ.items() if k != "VISIONMOE_NATIVE"}
    out = subprocess.run([sys.executable, "-m", "visionmoe", "build-native", "--status"], capture_output=True,
                         text=True, check=True, env=env).stdout
    assert out.startswith("built, auto: ") and native.cache_dir().name in out


@pytest.mark.slow
def test_build_writes_only_the_library_into_a_fresh_cache(monkeypatch, tmp_path):
    """A build into an empty cache (about 40 s) leaves the library and nothing else: no
    temporary folder, no object files; a second build is a no-op returning the same path."""
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if shutil.which("c++") is None or native._which("ninja") is None:
        pytest.skip("no C++ compiler or ninja")
    monkeypatch.setattr(native, "_CACHE_ROOT", tmp_path)
    lib = native.build()
    assert lib.is_file() and [p.name for p in lib.parent.iterdir()] == [lib.name]
    assert [p.name for p in (tmp_path / "native").iterdir()] == [lib.parent.name]
    assert native.build() == lib and native.load() is not None


@pytest.mark.parametrize("cmd", [["-m", "visionmoe.bench"], ["-m", "visionmoe", "bench"]])
def test_bench_refuses_a_mistyped_native_switch_in_one_line(cmd, tmp_path):
    """Before any timing, not as errored rows: one line naming the variable and its settings."""
    env = {**os.environ, "VISIONMOE_NATIVE": "yes"}
    res = subprocess.run([sys.executable, *cmd, "--quick", "--out", str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]
    assert "VISIONMOE_NATIVE='yes'" in res.stderr and "use auto" in res.stderr
    assert not (tmp_path / "bench.json").exists()
