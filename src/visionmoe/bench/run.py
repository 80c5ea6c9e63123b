"""``visionmoe bench``: MoE cost against the dense MLP of equal FLOPs, against the naive
per-expert loop and GShard's one-hot einsum, and against peer libraries that import here.

Everything runs in one process, in interleaved rounds (every case once per round, in a
fresh shuffled order), so the ratios compare like with like on a noisy machine. Reported:
median and interquartile range of the time per call, the ratio to dense (of the medians,
and the median and IQR of the per-round ratios, which cancel slow drifts of the machine),
tokens/s, minor page faults per call (4 KiB pages of fresh memory first touched: what
a fresh allocation costs on top of its arithmetic), and activation memory (bytes the
autograd graph saves for backward, measured with ``saved_tensors_hooks``).

Run ``python -m visionmoe.bench --help`` or ``visionmoe bench --help``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from ..moe import native
from ..runtime import allocator_state
from .cases import (
    Case,
    compiled_cases,
    export_cases,
    layer_cases,
    scaling_cases,
    small_layer_cases,
    tiny_vit_cases,
    vit_cases,
)
from .measure import add_traffic_estimate, memory_bandwidth, run_rounds, split_gemm_ratio, summarise

__all__ = ["run_bench", "background_load", "stop_load", "build_parser", "run_from_args", "main"]


def run_bench(
    *,
    batch: int = 64,
    tokens: int = 65,
    dim: int = 384,
    hidden: int = 1536,
    experts: int = 8,
    rounds: int = 7,
    inner: int = 1,
    threads: int = 2,
    peers: bool = True,
    vit: bool = True,
    vit_batch: int = 8,
    scaling: bool = True,
    crmoe: bool = True,
    small: bool = True,
    small_threads: tuple[int, ...] = (1, 2),
    export: bool = True,
    compiled: bool = True,
    load: int = 0,
    out: str | Path = "runs/bench",
    quick: bool = False,
    progress: bool = True,
    device: str = "cpu",
) -> dict:
    """Run the benchmark suites; write ``bench.json`` and ``bench.png`` to ``out``. ``device``:
    where the cases are built and timed (``cuda``: the ``grouped`` kernel vs dense on a GPU,
    synchronised around every timed call).

    ``small``: the recipes' shapes (the layer at D = 64, T = 50, B = 128 and the whole small
    ViT's training step and inference) at each of ``small_threads``. ``export``: onnxruntime
    inference of exported dense and MoE models (``visionmoe export``'s routed experts and
    ``--dense-experts``). ``compiled``: the small ViT's step and inference eager vs
    ``torch.compile`` (dense, and MoE in one graph), at each of ``small_threads``. ``load``:
    that many busy processes run beside the bench (a machine shared with other work: what
    oversubscribed threads cost)."""
    from ..train.context import resolve_device

    dev = resolve_device(device)
    with torch.device(dev):
        return _run_bench(batch=batch, tokens=tokens, dim=dim, hidden=hidden, experts=experts, rounds=rounds,
                          inner=inner, threads=threads, peers=peers, vit=vit, vit_batch=vit_batch, scaling=scaling,
                          crmoe=crmoe, small=small, small_threads=tuple(small_threads), export=export,
                          compiled=compiled, load=load, out=out, quick=quick, progress=progress, device=str(dev))

def _run_bench(*, batch, tokens, dim, hidden, experts, rounds, inner, threads, peers, vit, vit_batch, scaling, crmoe,
               small, small_threads, export, compiled, load, out, quick, progress, device) -> dict:
    if quick:
        batch, tokens, dim, hidden, rounds, vit_batch = 4, 17, 32, 128, 2, 1
    if load < 0 or threads < 1 or any(t < 1 for t in small_threads):
        raise ValueError(f"bench needs load >= 0 and thread counts >= 1, got load={load}, threads={threads}, "
                         f"small_threads={small_threads}")
    busy = background_load(load)
    try:
        return _run_suites(batch=batch, tokens=tokens, dim=dim, hidden=hidden, experts=experts, rounds=rounds,
                           inner=inner, threads=threads, peers=peers, vit=vit, vit_batch=vit_batch, scaling=scaling,
                           crmoe=crmoe, small=small and device == "cpu", small_threads=small_threads,
                           export=export and device == "cpu", compiled=compiled and device == "cpu", load=load,
                           out=out, quick=quick, progress=progress, device=device)
    finally:
        stop_load(busy)

def background_load(n: int) -> list[int]:
    """Start ``n`` processes that spin on a core each and return their pids (end them with
    :func:`stop_load`). They are started through a shell that exits at once, so they are not
    this process's children: ``run.threads: auto`` counts its children (data-loader workers)
    as the run's own work, and these stand for another program on the machine."""
    import subprocess
    import sys

    cmd = f"'{sys.executable}' -c 'while True: pass' >/dev/null 2>&1 & echo $!"
    return [int(subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, check=True).stdout)
            for _ in range(n)]

def stop_load(pids: list[int]) -> None:
    """Kill the processes :func:`background_load` started."""
    import os
    import signal

    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

def _run_suites(*, batch, tokens, dim, hidden, experts, rounds, inner, threads, peers, vit, vit_batch, scaling, crmoe,
                small, small_threads, export, compiled, load, out, quick, progress, device) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    from rich.console import Console

    console = Console(quiet=not progress)
    results: dict[str, Any] = {"config": dict(batch=batch, tokens=tokens, dim=dim, hidden=hidden, experts=experts,
                                              rounds=rounds, threads=threads, torch=torch.__version__, device=device,
                                              small_threads=list(small_threads) if small else [], load=load,
                                              allocator=allocator_state(), native=native.status()),
                               "suites": {}}
    from ..runtime import ThreadGovernor

    gov = ThreadGovernor(cap=max(threads, *small_threads) if small else threads, window=0.5)
    picked = gov.start()
    gov.stop()
    results["config"]["auto_threads"] = {"picked": picked, "others_busy_cores": gov.changes[0][0] if gov.changes
                                         else None}
    suites: list[tuple[str, list[Case], int, tuple[str, ...], int]] = []  # name, cases, units, modes, threads
    cases, status = layer_cases(batch=batch, tokens=tokens, dim=dim, hidden=hidden, experts=experts, ks=(1, 2),
                                peers=peers, label="layer")
    results["peers"] = status
    suites.append(("layer", cases, batch * tokens, ("fwd", "fwdbwd"), threads))
    if crmoe:
        c2, _ = layer_cases(batch=batch, tokens=tokens, dim=dim, hidden=hidden // 2, experts=16, ks=(2,),
                            peers=False, label="crmoe_shape")
        suites.append(("crmoe_shape", c2, batch * tokens, ("fwdbwd",), threads))
    if scaling:
        suites.append(("scaling", scaling_cases(batch=batch, tokens=tokens, dim=dim, hidden=hidden,
                                                experts_list=[4, 8, 16, 32, 64] if not quick else [2, 4]),
                       batch * tokens, ("fwdbwd",), threads))
    if vit:
        size = 224 if not quick else 32
        suites.append(("vit_step", vit_cases(batch=vit_batch, img_size=size, experts=experts), vit_batch,
                       ("fwdbwd",), threads))
    if small:
        sb, st, sd = (16, 17, 32) if quick else (128, 50, 64)
        for t in small_threads:
            suites.append((f"small_t{t}", small_layer_cases(batch=sb, tokens=st, dim=sd, hidden=4 * sd,
                                                            experts=(4,) if quick else (4, 16)),
                           sb * st, ("fwd", "fwdbwd"), t))
            suites.append((f"tiny_vit_t{t}", tiny_vit_cases(batch=sb, quick=quick), sb, ("fwd", "fwdbwd"), t))
    if compiled:
        cb = 16 if quick else 128
        for t in small_threads if small else (threads,):
            suites.append((f"compiled_t{t}", compiled_cases(batch=cb, quick=quick), cb, ("fwd", "fwdbwd"), t))
    if export:
        try:
            for t in small_threads if small else (threads,):
                for name, cs in export_cases(threads=t, vit_s=vit, quick=quick).items():
                    suites.append((f"{name}_t{t}", cs, cs[0].info["batch"], ("fwd",), t))
        except ImportError as e:
            results["export"] = f"skipped: {e} (pip install 'visionmoe[export]')"
    for name, cs, ntok, modes, nthreads in suites:
        console.print(f"[bold]bench[/] {name}: {len(cs)} cases x {rounds} rounds ({', '.join(modes)}, "
                      f"{nthreads} thread{'s' if nthreads > 1 else ''})")
        torch.set_num_threads(nthreads)
        run_rounds(cs, rounds if name != "vit_step" else max(2, rounds // 2), modes, inner)
        torch.set_num_threads(threads)
        results["suites"][name] = summarise(cs, ntok)
        if name == "scaling":
            results["bandwidth_gb_s"] = bw = memory_bandwidth(2**28 if not quick else 2**22)
            add_traffic_estimate(results["suites"][name], bw)
            for r in results["suites"][name]:
                if "E" in r:
                    r["split_gemm_ratio"] = round(split_gemm_ratio(batch * tokens, dim, hidden, r["E"]), 3)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    _plot(results, out / "bench.png")
    _print_tables(results, console)
    console.print(f"written {out / 'bench.json'} and {out / 'bench.png'}")
    return results

def _print_tables(results: dict, console) -> None:
    from rich.table import Table

    for suite, rows in results["suites"].items():
        t = Table(title=f"{suite} (ratio = median time / dense's; paired = median of per-round ratios)")
        cols = ["name", "fwd_ms", "fwd_ratio", "fwd_paired_ratio", "fwdbwd_ms", "fwdbwd_iqr_ms", "fwdbwd_ratio",
                "fwdbwd_paired_ratio",
                "fwdbwd_paired_iqr", "fwd_vs_eager", "fwdbwd_vs_eager", "fwdbwd_vs_eager_iqr", "fwdbwd_page_faults",
                "activation_ratio", "traffic_ratio",
                "split_gemm_ratio"]
        cols = [c for c in cols if any(c in r for r in rows)]
        for c in cols:
            t.add_column(c)
        for r in rows:
            t.add_row(*[str(r.get(c, r.get("error", "")[:40] if c == "fwdbwd_ms" else "")) for c in cols])
        console.print(t)
    if "bandwidth_gb_s" in results:
        bw = results["bandwidth_gb_s"]
        console.print(f"memory bandwidth: read {bw['read']} GB/s, write {bw['write']} GB/s (traffic_ratio: dense time "
                      "+ the extra expert parameters read twice and their gradients written once, over dense time)")
    auto = results["config"].get("auto_threads") or {}
    dense = {t: next((r.get("fwdbwd_ms") for r in rows if r["name"] == "tiny-vit-dense"), None)
             for t, rows in ((s.removeprefix("tiny_vit_t"), rows) for s, rows in results["suites"].items()
                             if s.startswith("tiny_vit_t"))}
    if auto.get("picked"):
        steps = ", ".join(f"{t} thread(s) {ms} ms" for t, ms in dense.items() if ms)
        console.print(f"threads: other processes kept {auto['others_busy_cores']} core(s) busy at the start "
                      f"(--load {results['config']['load']}); run.threads=auto would train on {auto['picked']}"
                      + (f"; the small ViT's dense train step: {steps}" if steps else ""))
    if "export" in results:
        console.print(f"export rows {results['export']}")
    for peer, st in results.get("peers", {}).items():
        console.print(f"peer {peer}: {st}")

def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["suites"].get("layer", []) if "fwdbwd_ratio" in r]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.5))
    names = [r["name"] for r in rows]
    # the median per-round ratio and its interquartile range (ratio of medians, no bar, if unpaired)
    vals = [r.get("fwdbwd_paired_ratio", r["fwdbwd_ratio"]) for r in rows]
    iqrs = [r.get("fwdbwd_paired_iqr", [v, v]) for r, v in zip(rows, vals)]
    errs = [[max(v - lo, 0) for v, (lo, _) in zip(vals, iqrs)], [max(hi - v, 0) for v, (_, hi) in zip(vals, iqrs)]]
    colors = ["tab:green" if n.startswith("visionmoe") else "tab:gray" if n == "dense" else "tab:orange"
              for n in names]
    ax.barh(names, vals, xerr=errs, color=colors, error_kw={"lw": 0.8, "capsize": 2})
    ax.set_xscale("log")
    for floor, label, dy in ((1.0, "top-1 floor", -0.9), (2.0, "top-2 floor", -0.9)):
        ax.axvline(floor, ls="--", lw=1, color="k")
        ax.text(floor * 1.02, dy, label, fontsize=8, va="bottom")
    ax.set_xlim(0.6, max(vals) * 1.6)
    for i, v in enumerate(vals):
        ax.text(0.62, i, f"{v:.2f}x", va="center", fontsize=8, color="white", fontweight="bold")
    cfg = results["config"]
    ax.set_xlabel("forward+backward time / dense MLP's in the same round, median over rounds, log scale\n"
                  "(lower is better; whiskers: interquartile range of the per-round ratios)")
    ax.set_title(f"MoE layer cost, {cfg['batch']}x{cfg['tokens']} tokens, D={cfg['dim']}, H={cfg['hidden']}, "
                 f"E={cfg['experts']}, {cfg['threads']} threads")
    ax.set_ylim(len(rows) - 0.5, -1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="visionmoe bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--tokens", type=int, default=65)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--inner", type=int, default=1, help="calls per timed sample")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-peers", action="store_true", help="skip peer libraries")
    p.add_argument("--no-vit", action="store_true", help="skip the whole ViT-S/16 training step")
    p.add_argument("--no-scaling", action="store_true", help="skip the E = 4..64 table")
    p.add_argument("--no-crmoe", action="store_true", help="skip the CR-MoE shape (E=16, top-2, H=2D)")
    p.add_argument("--no-small", action="store_true",
                   help="skip the recipes' shapes (the D=64 layer and the small ViT's train step and inference)")
    p.add_argument("--small-threads", type=int, nargs="+", default=[1, 2], metavar="N",
                   help="thread counts of the small suites and the export rows (default: 1 2)")
    p.add_argument("--no-export", action="store_true", help="skip the onnxruntime rows of exported models")
    p.add_argument("--no-compiled", action="store_true",
                   help="skip the small ViT eager vs torch.compile rows (about a minute of compiling)")
    p.add_argument("--load", type=int, default=0, metavar="N",
                   help="run N busy processes beside the bench: a machine shared with other work")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds (a smoke test, not a measurement)")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N: time the layers on a GPU")
    return p

def run_from_args(args: argparse.Namespace) -> dict:
    return run_bench(batch=args.batch, tokens=args.tokens, dim=args.dim, hidden=args.hidden, experts=args.experts,
                     rounds=args.rounds, inner=args.inner, threads=args.threads, peers=not args.no_peers,
                     vit=not args.no_vit, scaling=not args.no_scaling, crmoe=not args.no_crmoe,
                     small=not args.no_small, small_threads=tuple(args.small_threads), export=not args.no_export,
                     compiled=not args.no_compiled, load=args.load, out=args.out,
                     quick=args.quick, device=getattr(args, "device", "cpu"))

def main(argv: list[str] | None = None) -> int:
    run_from_args(build_parser().parse_args(argv))
    return 0
