"""How ``visionmoe bench`` measures: interleaved rounds in a shuffled order, medians and
seed-free paired ratios to dense, minor page faults, memory bandwidth and the split-GEMM
probe behind the weight-traffic estimate."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from .cases import Case, sync

__all__ = ["median_seconds", "memory_bandwidth", "split_gemm_ratio", "add_traffic_estimate", "run_rounds",
           "minor_faults", "paired_ratios", "summarise"]


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``repeats`` calls of ``fn``."""
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)

def memory_bandwidth(nbytes: int = 2**28, repeats: int = 5) -> dict[str, float]:
    """Main-memory bandwidth in GB/s with the current torch threads: ``read`` (a sum over a
    float32 buffer of ``nbytes``, far above the last-level cache by default) and ``write``
    (filling it); the median of ``repeats`` passes after one that pages the buffer in."""
    if nbytes < 4 or repeats < 1:
        raise ValueError(f"memory_bandwidth needs nbytes >= 4 and repeats >= 1, got {nbytes} and {repeats}")
    buf = torch.ones(nbytes // 4)
    nbytes = buf.numel() * 4
    return {"read": round(nbytes / median_seconds(buf.sum, repeats) / 1e9, 2),
            "write": round(nbytes / median_seconds(lambda: buf.fill_(0.5), repeats) / 1e9, 2)}

def split_gemm_ratio(rows: int, dim: int, hidden: int, experts: int, repeats: int = 5) -> float:
    """On one thread: the time of ``experts`` matmuls of ``rows / experts`` rows, each with its
    own ``(hidden, dim)`` weight (the fc1 GEMMs of a balanced top-1 layer), over one matmul
    of all ``rows`` with one weight (the dense fc1); median of ``repeats``. What splitting the
    GEMM costs by itself: smaller row blocks and a weight matrix to read and pack per expert."""
    if not 1 <= experts <= rows or repeats < 1:
        raise ValueError(f"split_gemm_ratio needs 1 <= experts <= rows and repeats >= 1, got experts={experts}, "
                         f"rows={rows}, repeats={repeats}")
    n = rows // experts
    x, out = torch.randn(n * experts, dim), torch.empty(n * experts, hidden)
    w = torch.randn(experts, hidden, dim)

    def one() -> None:
        torch.mm(x, w[0].t(), out=out)

    def split() -> None:
        for e in range(experts):
            torch.mm(x[e * n:(e + 1) * n], w[e].t(), out=out[e * n:(e + 1) * n])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one(), split()  # warm-up
        return median_seconds(split, repeats) / median_seconds(one, repeats)
    finally:
        torch.set_num_threads(threads)

def add_traffic_estimate(rows: list[dict], bandwidth: dict[str, float]) -> None:
    """For each MoE row of the scaling suite, ``traffic_ratio``: the dense MLP's
    forward+backward time plus the time to move the parameter bytes the MoE layer has
    beyond the dense MLP's — read in forward, read again in backward, gradient written — at
    the measured ``bandwidth``, over the dense time. At constant FLOPs this is the part of
    the cost that grows with E. An estimate, not a hard floor: a GEMM can overlap part of
    its loads with arithmetic, and caches hold the smaller layers."""
    dense = next((r for r in rows if r["name"] == "dense"), None)
    if dense is None or "fwdbwd_ms" not in dense:
        return
    per_byte = 2 / (bandwidth["read"] * 1e9) + 1 / (bandwidth["write"] * 1e9)  # seconds per byte
    for r in rows:
        if r is dense or "param_mb" not in r:
            continue
        extra = max(r["param_mb"] - dense["param_mb"], 0.0) * 1e6
        r["extra_param_mb"] = round(extra / 1e6, 3)
        r["traffic_ratio"] = round(1 + extra * per_byte * 1e3 / dense["fwdbwd_ms"], 3)

def run_rounds(cases: list[Case], rounds: int, modes: tuple[str, ...], inner: int) -> None:
    for mode in modes:
        fns = {}
        for c in cases:
            if c.error:
                continue
            try:
                fns[c.name] = c.make(mode == "fwdbwd")
                fns[c.name]()  # warm-up
            except Exception as e:  # noqa: BLE001
                c.error = f"{type(e).__name__}: {str(e)[:160]}"
        order = list(cases)
        rng = random.Random(0)
        for _ in range(rounds):
            rng.shuffle(order)  # a fresh order each round: no case always follows the same one
            for c in order:
                if c.name not in fns or c.error:
                    continue
                sync()
                f0 = minor_faults()
                t0 = time.perf_counter()
                for _ in range(inner):
                    fns[c.name]()
                sync()
                c.times[mode].append((time.perf_counter() - t0) / inner)
                if f0 is not None:
                    c.faults[mode].append((minor_faults() - f0) / inner)

def minor_faults() -> int | None:
    """This process's minor page faults so far (first touches of fresh memory), or None
    where ``resource`` is missing (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def paired_ratios(times: list[float], dense_times: list[float]) -> list[float]:
    """Per-round ratios ``times[r] / dense_times[r]`` (both timed in round r, moments
    apart), so a slow stretch of the machine scales both; empty when the rounds differ."""
    if len(times) != len(dense_times):
        return []
    return [t / d for t, d in zip(times, dense_times)]

def _add_paired(row: dict, key: str, iqr_key: str, times: list[float], base: list[float]) -> None:
    """``row[key]``: the median of the per-round ratios ``times / base``; ``row[iqr_key]``: their IQR."""
    paired = paired_ratios(times, base)
    if paired:
        pq = statistics.quantiles(paired, n=4) if len(paired) >= 2 else [paired[0]] * 3
        row[key] = round(statistics.median(paired), 3)
        row[iqr_key] = [round(pq[0], 3), round(pq[2], 3)]

def summarise(cases: list[Case], tokens: int) -> list[dict]:
    dense = next((c for c in cases if c.name == "dense" or c.name.endswith("-dense")), None)
    rows = []
    for c in cases:
        row: dict[str, Any] = {"name": c.name, "group": c.group, **c.info}
        if c.error:
            row["error"] = c.error
        for mode, ts in c.times.items():
            if not ts:
                continue
            med = statistics.median(ts)
            q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [med, med, med]
            row[f"{mode}_ms"] = round(med * 1e3, 3)
            row[f"{mode}_iqr_ms"] = round((q[2] - q[0]) * 1e3, 3)
            row[f"{mode}_tokens_per_s"] = round(tokens / med, 1)
            if c.faults.get(mode):  # 4 KiB pages of fresh memory touched per call (allocator cost)
                row[f"{mode}_page_faults"] = round(statistics.median(c.faults[mode]))
            if dense is not None and dense.times[mode]:
                row[f"{mode}_ratio"] = round(med / statistics.median(dense.times[mode]), 3)
                _add_paired(row, f"{mode}_paired_ratio", f"{mode}_paired_iqr", ts, dense.times[mode])
        twin = next((e for e in cases if e.name == c.info.get("eager")), None)
        for mode, ts in c.times.items() if twin is not None else ():  # a compiled case / its eager twin
            if ts:
                _add_paired(row, f"{mode}_vs_eager", f"{mode}_vs_eager_iqr", ts, twin.times[mode])
        if c.memory is not None:
            row["activation_mb"] = round(c.memory / 2**20, 2)
            if dense is not None and dense.memory:
                row["activation_ratio"] = round(c.memory / dense.memory, 3)
        rows.append(row)
    return rows
