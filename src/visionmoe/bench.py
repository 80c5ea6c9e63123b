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
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.layers import Mlp
from torch import Tensor, nn

from .moe import Experts, LinearRouter, MoE, MoEConfig, PooledRouter, SortedDispatcher, build_moe, native
from .moe.experts import grouped_mm_available
from .moe.reference import EinsumDispatcher, LoopDispatcher
from .runtime import allocator_state

__all__ = ["run_bench", "main", "paired_ratios", "memory_bandwidth", "add_traffic_estimate",
           "split_gemm_ratio"]


# ----------------------------------------------------------------------------- measuring
def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def activation_bytes(fn: Callable[[], Tensor], module: nn.Module | None = None) -> int:
    """Bytes of distinct tensor storages the autograd graph saves during ``fn()``, not
    counting the storages of ``module``'s parameters (weights are not activations)."""
    seen: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in module.parameters()} if module is not None else set()

    def pack(t: Tensor):
        try:
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


@dataclass
class Case:
    """One thing to time: ``make()`` returns a callable doing one forward (and backward)."""

    name: str
    group: str
    make: Callable[[bool], Callable[[], Any]]
    info: dict = field(default_factory=dict)
    times: dict[str, list[float]] = field(default_factory=lambda: {"fwd": [], "fwdbwd": []})
    faults: dict[str, list[float]] = field(default_factory=lambda: {"fwd": [], "fwdbwd": []})
    memory: int | None = None
    error: str | None = None


def _loss_of(out) -> Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if hasattr(out, "outputs"):
        out = out.outputs
    return out.float().pow(2).mean()


def _layer_case(name: str, group: str, module: nn.Module, x: Tensor, aux: Callable[[], Tensor] | None = None,
                **info) -> Case:
    def make(backward: bool):
        xx = x.detach().clone().requires_grad_(backward)

        def step():
            with torch.set_grad_enabled(backward):
                out = module(xx)
                if backward:
                    loss = _loss_of(out)
                    if aux is not None:
                        loss = loss + aux()
                    loss.backward()
                    module.zero_grad(set_to_none=True)
                    xx.grad = None
            return out

        return step

    case = Case(name, group, make, info)
    try:
        case.memory = activation_bytes(lambda: module(x.detach().clone().requires_grad_(True)), module)
    except Exception as e:  # noqa: BLE001 - a peer that fails is reported, not fatal
        case.error = f"{type(e).__name__}: {e}"
    return case


def _moe(dim: int, hidden: int, experts: int, k: int, dispatcher=None, impl: str = "auto", level: str = "token",
         **experts_kw):
    router = LinearRouter(dim, experts, k, aux_weights={"importance": 0.005})
    if level == "image":
        router = PooledRouter(router, pool="cls")
    return MoE(router=router, experts=Experts(experts, dim, hidden, impl=impl, **experts_kw),
               dispatcher=dispatcher or SortedDispatcher())


# ----------------------------------------------------------------------------- peers
def _peer_cases(group: str, x: Tensor, dim: int, hidden: int, experts: int, k: int) -> tuple[list[Case], dict]:
    """Cases for peer libraries; returns (cases, status by peer name)."""
    cases, status = [], {}
    # DeepSpeed (pip install --no-build-isolation deepspeed): dropless (drop_tokens=False)
    try:
        import torch.distributed as dist
        from deepspeed.moe.layer import MoE as DSMoE

        if not dist.is_initialized():  # a one-process group through a fresh file: no port to collide on
            import tempfile

            store = Path(tempfile.mkdtemp(prefix="visionmoe-bench-")) / "rendezvous"
            dist.init_process_group("gloo", init_method=f"file://{store}", world_size=1, rank=0)
        m = DSMoE(dim, Mlp(dim, hidden), num_experts=experts, k=k, drop_tokens=False)
        cases.append(_layer_case(f"deepspeed-k{k}", group, m, x, capacity="none (drop_tokens=False)"))
        status["deepspeed"] = "ran (drop_tokens=False: dropless, equal FLOPs)"
    except Exception as e:  # noqa: BLE001
        status["deepspeed"] = f"unavailable: {type(e).__name__}: {str(e)[:120]}"
    # lucidrains mixture-of-experts: top-2 only; its default train capacity factor 1.25
    if k == 2:
        try:
            from mixture_of_experts import MoE as LMoE

            m = LMoE(dim, num_experts=experts, hidden_dim=hidden, activation=nn.GELU, second_policy_train="all",
                     second_policy_eval="all")
            cases.append(_layer_case("mixture-of-experts-k2", group, m, x, capacity="its default 1.25"))
            status["mixture-of-experts"] = "ran (second_policy='all', its default capacity factor 1.25)"
        except Exception as e:  # noqa: BLE001
            status["mixture-of-experts"] = f"unavailable: {type(e).__name__}: {str(e)[:120]}"
    # st-moe-pytorch: top-n gating; its default train capacity factor 1.25
    try:
        from st_moe_pytorch import MoE as STMoE

        if k < 2:
            raise ValueError("st-moe-pytorch needs gating_top_n >= 2")
        m = STMoE(dim, num_experts=experts, expert_hidden_mult=hidden // dim, gating_top_n=k,
                  threshold_train=0.0, threshold_eval=0.0)
        cases.append(_layer_case(f"st-moe-pytorch-k{k}", group, m, x, capacity="its default 1.25"))
        status["st-moe-pytorch"] = "ran (threshold 0: always top-n, its default capacity factor 1.25)"
    except Exception as e:  # noqa: BLE001
        status["st-moe-pytorch"] = f"unavailable: {type(e).__name__}: {str(e)[:120]}"
    # soft-moe-pytorch: Soft MoE (every token weighs into every slot, no top-k, nothing dropped);
    # E experts x s slots per image with E*s <= tokens: about the dense MLP's expert FLOPs, so in
    # the top-1 group, plus its dispatch and combine einsums over all (token, slot) pairs
    if k == 1:
        try:
            from soft_moe_pytorch import SoftMoE

            slots = x.shape[1] // experts
            if slots < 1:
                raise ValueError(f"{x.shape[1]} tokens give no slot per expert for {experts} experts")
            m = SoftMoE(dim, num_experts=experts, num_slots=slots, expert_mult=hidden // dim, is_distributed=False)
            cases.append(_layer_case("soft-moe-pytorch", group, m, x, capacity=f"{slots} slots per expert"))
            status["soft-moe-pytorch"] = (f"ran (Soft MoE, {experts} x {slots} slots per image: "
                                          f"{experts * slots} of {x.shape[1]} tokens' expert FLOPs)")
        except Exception as e:  # noqa: BLE001
            status["soft-moe-pytorch"] = f"unavailable: {type(e).__name__}: {str(e)[:120]}"
    for name, mod, why in (("tutel", "tutel", "not on PyPI"), ("fastmoe", "fmoe", "needs CUDA to build"),
                           ("megablocks", "megablocks", "needs CUDA (Triton/stk kernels)")):
        try:
            __import__(mod)
            status[name] = "importable (no CPU path benchmarked)"
        except Exception:  # noqa: BLE001
            status[name] = f"not installed ({why})"
    return cases, status


# ----------------------------------------------------------------------------- suites
def layer_cases(*, batch: int, tokens: int, dim: int, hidden: int, experts: int, ks: tuple[int, ...],
                peers: bool, label: str) -> tuple[list[Case], dict]:
    x = torch.randn(batch, tokens, dim)
    group = label
    cases = [_layer_case("dense", group, Mlp(dim, hidden), x)]
    status: dict = {}
    for k in ks:
        ours = _moe(dim, hidden, experts, k)
        cases.append(_layer_case(f"visionmoe-k{k}", group, ours, x, aux=lambda m=ours: m.last.aux_loss, k=k))
        variants = {"split": dict(impl="split"), "grouped": dict(impl="grouped")}
        if k == 1:  # the fused kernel's options: experts one after another; activation recomputed;
            # on the Python pool when the default runs them in the compiled loop (built, >= MIN_ROWS rows)
            variants.update({"serial": dict(threads=False), "recompute": dict(recompute=True)})
            if native.load() is not None:
                variants["python"] = dict(threads="python")
        for variant, kw in variants.items():
            if variant == "grouped" and not grouped_mm_available(x.device):
                continue
            alt = _moe(dim, hidden, experts, k, **kw)
            cases.append(_layer_case(f"visionmoe-{variant}-k{k}", group, alt, x, aux=lambda m=alt: m.last.aux_loss,
                                     k=k))
        loop = _moe(dim, hidden, experts, k, dispatcher=LoopDispatcher())
        cases.append(_layer_case(f"naive-loop-k{k}", group, loop, x, k=k))
        ein = _moe(dim, hidden, experts, k, dispatcher=EinsumDispatcher(capacity_factor=1.25))
        cases.append(_layer_case(f"gshard-einsum-k{k}", group, ein, x, k=k, capacity="1.25"))
        if peers:
            pc, st = _peer_cases(group, x, dim, hidden, experts, k)
            cases += pc
            status.update(st)
    if 1 in ks:
        img = _moe(dim, hidden, experts, 1, level="image")
        cases.append(_layer_case("visionmoe-image-k1", group, img, x, k=1))
        # the newer routing methods, at the cost of top-1: expert choice with capacity factor 1
        # (each token one expert on average), Soft MoE with as many slots as tokens (vmoe's
        # capacity factor 1: p = round(T / E) slots per expert), loss-free top-1
        slots = max(1, round(tokens / experts))
        for name, cfg in (("expert-choice-c1", dict(selection="expert_choice", capacity_factor=1.0)),
                          ("soft-moe-c1", dict(router="soft", slots_per_expert=slots)),
                          ("loss-free-k1", dict(balance="loss_free", aux_weights={}))):
            layer = build_moe(dim, hidden, MoEConfig(num_experts=experts, top_k=1, noise_std=0.0, **cfg))
            cases.append(_layer_case(f"visionmoe-{name}", group, layer, x, aux=lambda m=layer: m.last.aux_loss, k=1))
    return cases, status


def vit_cases(*, batch: int, img_size: int, experts: int, threads: bool | str = True) -> list[Case]:
    """A dense and an MoE (every-2, top-1) ViT-S/16 training step; ``threads``: the MoE
    layers' ``Experts.threads`` (a :data:`~visionmoe.moe.experts.THREAD_MODES` value)."""
    from .models import create_model

    x = torch.randn(batch, 3, img_size, img_size)
    y = torch.randint(0, 1000, (batch,))
    cases = []
    for name, moe in (("vit-s16-dense", None), ("vit-s16-moe-every2-k1", dict(num_experts=experts, top_k=1,
                                                                              placement="every_2"))):
        model = create_model("vit_small_patch16_224", img_size=img_size, moe=moe)
        for m in model.modules():
            if isinstance(m, Experts):
                m.threads = threads
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the Trainer (optim.fused)

        def make(backward: bool, model=model, opt=opt):
            def step():
                model.train(backward)
                with torch.set_grad_enabled(backward):
                    out = model(x)
                    if backward:
                        loss = torch.nn.functional.cross_entropy(out, y) + model.moe_aux_loss()
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                return out

            return step

        cases.append(Case(name, "vit_step", make, {"batch": batch, "img_size": img_size}))
    return cases


def _param_mb(module: nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 1e6


def scaling_cases(*, batch: int, tokens: int, dim: int, hidden: int, experts_list: list[int]) -> list[Case]:
    x = torch.randn(batch, tokens, dim)
    dense = Mlp(dim, hidden)
    cases = [_layer_case("dense", "scaling", dense, x, param_mb=round(_param_mb(dense), 3))]
    for e in experts_list:
        m = _moe(dim, hidden, e, 1)
        cases.append(_layer_case(f"visionmoe-E{e}-k1", "scaling", m, x, aux=lambda m=m: m.last.aux_loss, E=e, k=1,
                                 param_mb=round(_param_mb(m), 3)))
    return cases


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
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
    return {"read": round(nbytes / _median_seconds(buf.sum, repeats) / 1e9, 2),
            "write": round(nbytes / _median_seconds(lambda: buf.fill_(0.5), repeats) / 1e9, 2)}


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
        return _median_seconds(split, repeats) / _median_seconds(one, repeats)
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


def _run_rounds(cases: list[Case], rounds: int, modes: tuple[str, ...], inner: int) -> None:
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
                _sync()
                f0 = _minor_faults()
                t0 = time.perf_counter()
                for _ in range(inner):
                    fns[c.name]()
                _sync()
                c.times[mode].append((time.perf_counter() - t0) / inner)
                if f0 is not None:
                    c.faults[mode].append((_minor_faults() - f0) / inner)


def _minor_faults() -> int | None:
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


def _summarise(cases: list[Case], tokens: int) -> list[dict]:
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
                paired = paired_ratios(ts, dense.times[mode])
                if paired:
                    pq = statistics.quantiles(paired, n=4) if len(paired) >= 2 else [paired[0]] * 3
                    row[f"{mode}_paired_ratio"] = round(statistics.median(paired), 3)
                    row[f"{mode}_paired_iqr"] = [round(pq[0], 3), round(pq[2], 3)]
        if c.memory is not None:
            row["activation_mb"] = round(c.memory / 2**20, 2)
            if dense is not None and dense.memory:
                row["activation_ratio"] = round(c.memory / dense.memory, 3)
        rows.append(row)
    return rows


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
    out: str | Path = "runs/bench",
    quick: bool = False,
    progress: bool = True,
    device: str = "cpu",
) -> dict:
    """Run the benchmark suites; write ``bench.json`` and ``bench.png`` to ``out``. ``device``:
    where the cases are built and timed (``cuda``: the ``grouped`` kernel vs dense on a GPU,
    synchronised around every timed call)."""
    from .train.context import resolve_device

    dev = resolve_device(device)
    with torch.device(dev):
        return _run_bench(batch=batch, tokens=tokens, dim=dim, hidden=hidden, experts=experts, rounds=rounds,
                          inner=inner, threads=threads, peers=peers, vit=vit, vit_batch=vit_batch, scaling=scaling,
                          crmoe=crmoe, out=out, quick=quick, progress=progress, device=str(dev))


def _run_bench(*, batch, tokens, dim, hidden, experts, rounds, inner, threads, peers, vit, vit_batch, scaling, crmoe,
               out, quick, progress, device) -> dict:
    if quick:
        batch, tokens, dim, hidden, rounds, vit_batch = 4, 17, 32, 128, 2, 1
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    from rich.console import Console

    console = Console(quiet=not progress)
    results: dict[str, Any] = {"config": dict(batch=batch, tokens=tokens, dim=dim, hidden=hidden, experts=experts,
                                              rounds=rounds, threads=threads, torch=torch.__version__, device=device,
                                              allocator=allocator_state(), native=native.status()),
                               "suites": {}}
    suites: list[tuple[str, list[Case], int, tuple[str, ...]]] = []
    cases, status = layer_cases(batch=batch, tokens=tokens, dim=dim, hidden=hidden, experts=experts, ks=(1, 2),
                                peers=peers, label="layer")
    results["peers"] = status
    suites.append(("layer", cases, batch * tokens, ("fwd", "fwdbwd")))
    if crmoe:
        c2, _ = layer_cases(batch=batch, tokens=tokens, dim=dim, hidden=hidden // 2, experts=16, ks=(2,),
                            peers=False, label="crmoe_shape")
        suites.append(("crmoe_shape", c2, batch * tokens, ("fwdbwd",)))
    if scaling:
        suites.append(("scaling", scaling_cases(batch=batch, tokens=tokens, dim=dim, hidden=hidden,
                                                experts_list=[4, 8, 16, 32, 64] if not quick else [2, 4]),
                       batch * tokens, ("fwdbwd",)))
    if vit:
        size = 224 if not quick else 32
        suites.append(("vit_step", vit_cases(batch=vit_batch, img_size=size, experts=experts), vit_batch,
                       ("fwdbwd",)))
    for name, cs, ntok, modes in suites:
        console.print(f"[bold]bench[/] {name}: {len(cs)} cases x {rounds} rounds ({', '.join(modes)})")
        _run_rounds(cs, rounds if name != "vit_step" else max(2, rounds // 2), modes, inner)
        results["suites"][name] = _summarise(cs, ntok)
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
        cols = ["name", "fwd_ms", "fwd_ratio", "fwdbwd_ms", "fwdbwd_iqr_ms", "fwdbwd_ratio", "fwdbwd_paired_ratio",
                "fwdbwd_paired_iqr", "fwdbwd_page_faults", "activation_ratio", "traffic_ratio",
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
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds (a smoke test, not a measurement)")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N: time the layers on a GPU")
    return p


def run_from_args(args: argparse.Namespace) -> dict:
    return run_bench(batch=args.batch, tokens=args.tokens, dim=args.dim, hidden=args.hidden, experts=args.experts,
                     rounds=args.rounds, inner=args.inner, threads=args.threads, peers=not args.no_peers,
                     vit=not args.no_vit, scaling=not args.no_scaling, crmoe=not args.no_crmoe, out=args.out,
                     quick=args.quick, device=getattr(args, "device", "cpu"))


def main(argv: list[str] | None = None) -> int:
    run_from_args(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":  # pragma: no cover
    import sys

    from visionmoe.cli.environment import apply_environment

    try:
        apply_environment()  # as the `visionmoe` program does: allocator, native mode and cache
        code = main()
    except ValueError as e:  # e.g. a mistyped VISIONMOE_MALLOC / VISIONMOE_NATIVE: one line, as the program says it
        print(f"visionmoe bench: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(code)
