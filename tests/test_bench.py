"""Smoke test of `visionmoe bench` (tiny shapes; no timing assertions)."""

import json
import os

import pytest
import torch

from visionmoe.bench import activation_bytes, run_bench
from visionmoe.moe import Experts, LinearRouter, MoE


def test_quick_bench_writes_json_and_plot(tmp_path):
    res = run_bench(quick=True, peers=False, vit=False, out=tmp_path, progress=False)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.png").stat().st_size > 0
    names = {r["name"] for r in data["suites"]["layer"]}
    assert {"dense", "visionmoe-k1", "visionmoe-k2", "naive-loop-k1", "gshard-einsum-k2", "visionmoe-image-k1",
            "visionmoe-serial-k1", "visionmoe-recompute-k1", "visionmoe-expert-choice-c1", "visionmoe-soft-moe-c1",
            "visionmoe-loss-free-k1"} <= names
    assert not [r["error"] for r in data["suites"]["layer"] if "error" in r]
    dense = next(r for r in res["suites"]["layer"] if r["name"] == "dense")
    assert dense["fwdbwd_ratio"] == 1.0 and dense["activation_ratio"] == 1.0 and dense["fwdbwd_paired_ratio"] == 1.0
    assert all("fwdbwd_ms" in r for r in data["suites"]["layer"] if "error" not in r)
    # the recipes' shapes at one and two threads, and the exported models in onnxruntime
    assert data["config"]["small_threads"] == [1, 2]
    auto = data["config"]["auto_threads"]  # what run.threads=auto would pick beside the bench's load
    assert auto["picked"] in (1, 2) and auto["others_busy_cores"] >= 0 or not os.path.exists("/proc/stat")
    for t in (1, 2):
        small = {r["name"]: r for r in data["suites"][f"small_t{t}"]}
        assert {"dense", "visionmoe-E4-k1", "visionmoe-E4-k2", "visionmoe-E4-image-k1"} <= set(small)
        vit = {r["name"]: r for r in data["suites"][f"tiny_vit_t{t}"]}
        assert set(vit) == {"tiny-vit-dense", "tiny-vit-moe-E4-k1", "tiny-vit-moe-E4-k2", "tiny-vit-moe-E4-image-k1"}
        assert all("fwd_ratio" in r and "fwdbwd_ratio" in r for r in vit.values())
        # eager vs torch.compile (fullgraph; the MoE under compile_settings, with the train capacity's
        # data-dependent row count): every case ran, each compiled row paired with its eager twin
        comp = {r["name"]: r for r in data["suites"][f"compiled_t{t}"]}
        assert set(comp) == {"tiny-vit-dense", "tiny-vit-dense-compiled", "tiny-vit-moe-E4-k1",
                             "tiny-vit-moe-E4-k1-compiled"}
        assert not [r["error"] for r in comp.values() if "error" in r]
        for name in ("tiny-vit-dense-compiled", "tiny-vit-moe-E4-k1-compiled"):
            assert comp[name]["eager"] == name.removesuffix("-compiled")
            assert comp[name]["fwd_vs_eager"] > 0 and comp[name]["fwdbwd_vs_eager"] > 0
        assert "fwdbwd_vs_eager" not in comp["tiny-vit-moe-E4-k1"]
        if "export" not in data:  # onnxruntime installed
            for b in (1, 32):
                rows = {r["name"]: r for r in data["suites"][f"export_tiny-vit_b{b}_t{t}"]}
                assert rows["tiny-vit-dense"]["fwd_ratio"] == 1.0
                assert {"tiny-vit-moe-sparse", "tiny-vit-moe-sparse-cf1", "tiny-vit-moe-dense-experts"} <= set(rows)
                assert all("error" not in r for r in rows.values())


def test_activation_bytes_excludes_parameters_and_counts_saved_tensors():
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(5, 8, requires_grad=True)
    # Linear saves its input (5x8 floats); the weight is a parameter and is not counted
    assert activation_bytes(lambda: lin(x), lin) == 5 * 8 * 4


def test_fused_moe_activation_memory_against_dense_mlp():
    """The performance target: a top-1 MoE layer keeps at most 1.2x the dense MLP's
    activations. The fused kernel keeps x (shared with the router), the pre-activation, the
    activation and the expert outputs (the gate weights need their gradient): (2D + 2H) /
    (D + 2H) of the dense MLP's x, pre-activation and activation, plus the router's few
    S x E tensors; recomputing the activation in backward drops it to (2D + H) / (D + 2H)."""
    from timm.layers import Mlp

    S, D, H = 64, 32, 128
    x = torch.randn(4, 16, D)
    dense = Mlp(D, H)
    base = activation_bytes(lambda: dense(x.clone().requires_grad_()), dense)
    assert base == 4 * S * (D + 2 * H)  # float32: fc1's input, fc2's input, GELU's input
    for recompute, low, high in ((False, (2 * D + 2 * H) / (D + 2 * H), 1.2), (True, (2 * D + H) / (D + 2 * H), 1.0)):
        moe = MoE(router=LinearRouter(D, 4, k=1), experts=Experts(4, D, H, impl="fused", recompute=recompute))
        ratio = activation_bytes(lambda moe=moe: moe(x.clone().requires_grad_()), moe) / base
        assert low <= ratio < high, (recompute, ratio)


def test_paired_ratio_is_the_median_of_per_round_ratios():
    from visionmoe.bench.measure import Case, paired_ratios
    from visionmoe.bench.measure import summarise as _summarise

    assert paired_ratios([2.0, 3.0], [1.0]) == []  # rounds differ: no pairing
    dense = Case("dense", "layer", make=lambda b: None)
    moe = Case("moe", "layer", make=lambda b: None)
    # the machine slows down 3x in round 3; per-round ratios 1.1, 1.2, 1.1 (median 1.1), while
    # the ratio of medians mixes rounds: median(1.1, 2.4, 6.6) / median(1, 2, 6) = 1.2
    dense.times["fwdbwd"] = [1.0, 2.0, 6.0]
    moe.times["fwdbwd"] = [1.1, 2.4, 6.6]
    rows = {r["name"]: r for r in _summarise([dense, moe], tokens=10)}
    assert rows["moe"]["fwdbwd_ratio"] == 1.2
    assert rows["moe"]["fwdbwd_paired_ratio"] == 1.1
    assert rows["moe"]["fwdbwd_paired_iqr"][0] <= 1.1 <= rows["moe"]["fwdbwd_paired_iqr"][1]
    assert rows["dense"]["fwdbwd_paired_ratio"] == 1.0


def test_page_faults_count_fresh_memory(monkeypatch):
    """A call that fills a fresh 64 MiB tensor (above glibc's 32 MiB mmap ceiling, so it is
    new memory every call) touches 16,384 new 4 KiB pages; a call that reuses a buffer
    touches almost none."""
    from visionmoe.bench.measure import Case
    from visionmoe.bench.measure import minor_faults as _minor_faults
    from visionmoe.bench.measure import run_rounds as _run_rounds
    from visionmoe.bench.measure import summarise as _summarise

    from .test_runtime import thp_always

    if _minor_faults() is None or thp_always():
        pytest.skip("needs Linux getrusage and 4 KiB pages")
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    n = 64 * 2**20 // 4
    buf = torch.empty(n)
    fresh = Case("fresh", "t", make=lambda b: lambda: torch.ones(n))
    reuse = Case("dense", "t", make=lambda b: lambda: buf.fill_(1.0))
    _run_rounds([fresh, reuse], rounds=3, modes=("fwd",), inner=1)
    rows = {r["name"]: r for r in _summarise([reuse, fresh], tokens=1)}
    assert rows["fresh"]["fwd_page_faults"] >= 0.9 * n * 4 // 4096
    assert rows["dense"]["fwd_page_faults"] < 100


def test_scaling_rows_carry_a_weight_traffic_estimate(tmp_path):
    """The E = 4..64 table explains its growth: every MoE row has the parameter bytes beyond
    the dense MLP's and the ratio dense time + 3 passes over them would give at the measured
    bandwidth, recomputed here from the JSON by hand."""
    res = run_bench(quick=True, peers=False, vit=False, crmoe=False, small=False, export=False, compiled=False,
                    out=tmp_path, progress=False)
    rows = {r["name"]: r for r in res["suites"]["scaling"]}
    bw = res["bandwidth_gb_s"]
    assert bw["read"] > 0 and bw["write"] > 0
    D, H = res["config"]["dim"], res["config"]["hidden"]
    dense = rows["dense"]
    assert dense["param_mb"] == round((2 * D * H + H + D) * 4 / 1e6, 3)  # timm Mlp, float32
    ratios = []
    for e in (2, 4):
        r = rows[f"visionmoe-E{e}-k1"]
        expert_bytes = (2 * D * H + H + D) * 4
        router_bytes = (D * e + e) * 4  # LinearRouter: a D -> E linear layer with bias
        assert abs(r["extra_param_mb"] - ((e - 1) * expert_bytes + router_bytes) / 1e6) < 2e-3
        seconds = r["extra_param_mb"] * 1e6 * (2 / (bw["read"] * 1e9) + 1 / (bw["write"] * 1e9))
        assert r["traffic_ratio"] == pytest.approx(1 + seconds * 1e3 / dense["fwdbwd_ms"], abs=2e-3)
        ratios.append(r["traffic_ratio"])
        assert r["split_gemm_ratio"] > 0
    # more experts, more bytes; the ratio (rounded to 3 decimals) can reach 1.000 when a loaded
    # machine makes the dense step slow, so it is compared without strictness
    assert rows["visionmoe-E2-k1"]["extra_param_mb"] < rows["visionmoe-E4-k1"]["extra_param_mb"]
    assert 1 <= ratios[0] <= ratios[1]


def test_memory_bandwidth_is_bytes_over_time(monkeypatch):
    """A fake clock where every pass over the buffer takes 1 ms: 4 MB / 1 ms = 4 GB/s."""
    import itertools

    import visionmoe.bench.measure as b

    ticks = itertools.count()
    monkeypatch.setattr(b.time, "perf_counter", lambda: next(ticks) * 1e-3)
    assert b.memory_bandwidth(nbytes=4 * 10**6, repeats=3) == {"read": 4.0, "write": 4.0}


def test_split_gemm_ratio_times_the_expert_matmuls_on_one_thread(monkeypatch):
    """A fake clock that advances by the rows each matmul multiplies plus 8 per call: one
    GEMM of 64 rows costs 72, four of 16 rows cost 4 * 24 = 96, ratio 4/3; every matmul sees
    one thread, and the caller's count comes back."""
    import visionmoe.bench.measure as b

    clock = [0.0]
    seen_threads = set()

    def fake_mm(x, w, out):
        assert out.shape == (x.shape[0], w.shape[1])
        seen_threads.add(torch.get_num_threads())
        clock[0] += x.shape[0] + 8

    monkeypatch.setattr(b.torch, "mm", fake_mm)
    monkeypatch.setattr(b.time, "perf_counter", lambda: clock[0])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert b.split_gemm_ratio(64, 4, 6, experts=4, repeats=3) == pytest.approx(96 / 72)
        assert seen_threads == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("call, word", [
    (lambda b: b.split_gemm_ratio(4, 2, 2, experts=8), "experts"),
    (lambda b: b.split_gemm_ratio(64, 2, 2, experts=4, repeats=0), "repeats"),
    (lambda b: b.memory_bandwidth(nbytes=2), "nbytes"),
    (lambda b: b.memory_bandwidth(nbytes=64, repeats=0), "repeats"),
])
def test_bench_probes_reject_sizes_they_cannot_time(call, word):
    """More experts than rows (an empty GEMM per expert), no repeats or a buffer smaller than
    one float would divide by zero or time nothing: a ValueError that names the argument."""
    import visionmoe.bench.measure as b

    with pytest.raises(ValueError, match=word):
        call(b)


def test_peer_cases_run_the_pure_python_peers_and_report_the_missing(monkeypatch):
    """The peers that install from PyPI (the `peers` extra) each give a case whose forward and
    forward + backward run at the bench's shapes; one that cannot import is reported, not fatal."""
    import sys

    from visionmoe.bench.cases import peer_cases as _peer_cases

    for mod in ("mixture_of_experts", "st_moe_pytorch", "soft_moe_pytorch"):
        pytest.importorskip(mod)
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed (and no process group here)
    monkeypatch.setitem(sys.modules, "deepspeed.moe.layer", None)
    torch.manual_seed(0)
    x = torch.randn(2, 17, 32)
    names, status = set(), {}
    for k in (1, 2):
        cases, st = _peer_cases("layer", x, 32, 64, 4, k)
        status.update(st)
        for c in cases:
            assert c.error is None, (c.name, c.error)
            assert c.memory > 0
            out = c.make(False)()
            out = out[0] if isinstance(out, tuple) else out
            assert out.shape == x.shape and torch.isfinite(out).all(), c.name
            c.make(True)()  # forward + backward
            names.add(c.name)
    assert names == {"soft-moe-pytorch", "mixture-of-experts-k2", "st-moe-pytorch-k2"}
    # 17 tokens over 4 experts: 4 slots each, 16 of 17 tokens' expert FLOPs
    assert status["soft-moe-pytorch"].startswith("ran (Soft MoE, 4 x 4 slots per image: 16 of 17")
    assert status["deepspeed"].startswith("unavailable: ")
    assert status["tutel"] == "not installed (not on PyPI)"


def test_vit_cases_set_the_moe_layers_thread_mode(monkeypatch):
    """vit_cases(threads=...) is what the MoE ViT step's expert loops run with."""
    import visionmoe.moe.experts as ex
    import visionmoe.moe.kernels.fused as fused
    from visionmoe.bench import vit_cases

    seen = []
    plan = fused.native_plan
    monkeypatch.setattr(ex, "MIN_THREADED_WORK", 0)

    def spy(counts, threaded, gelu):
        seen.append(threaded)
        return plan(counts, threaded, gelu)

    monkeypatch.setattr(fused, "native_plan", spy)
    dense, moe = vit_cases(batch=2, img_size=32, experts=2, threads=False)  # the default is True
    assert dense.name == "vit-s16-dense" and moe.name == "vit-s16-moe-every2-k1"
    moe.make(True)()
    assert seen and set(seen) == {False}  # every MoE block's forward


def test_bench_data_times_the_loader_and_a_training_step(tmp_path, capsys):
    import json

    from visionmoe.cli.main import main
    from visionmoe.data import make_photo_folder

    root = make_photo_folder(tmp_path / "p", per_class=2, val_per_class=0, min_size=40, max_size=48)
    assert main(["bench-data", str(root / "train"), "--size", "32", "--workers", "1", "--batch-size", "4",
                 "--batches", "2", "--model", "vit_tiny_patch4_32", "--model-batch", "4", "--model-steps", "2",
                 "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / "bench_data.json").read_text())
    assert res["loader"]["images"] == 8 and res["loader"]["images_per_s"] > 0
    assert res["model"]["images_per_s"] > 0 and res["model"]["device"] == "cpu"
    assert "loader:" in capsys.readouterr().out
