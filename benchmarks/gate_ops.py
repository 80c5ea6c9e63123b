"""The router's two few-expert CPU fast paths against the plain ops they replace
(docs/performance.md, "Two per-call costs of the small shapes").

``visionmoe.moe.gating`` computes the gate softmax over the first axis of the transposed logits
below ``FAST_SOFTMAX_BELOW`` experts and the top-1 choice with ``max`` (``top_k``). This script
times, in one process and interleaved rounds, the recipes' D = 64 MoE layer (B = 128, T = 50,
H = 256, top-1, the bench's ``moe_layer``) with both fast paths ("new") and with the plain
``softmax(-1)`` and ``topk`` ("old"), beside the dense MLP, forward (no grad) and
forward + backward, for each E and thread count; prints the median paired ratios:

    python benchmarks/gate_ops.py                       # E = 4, 8, 16 at 1 and 2 threads, ~1 minute
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _args import positive_int  # benchmarks/_args.py (this script runs as a file)


def _plain_top_k(scores, k):
    values, indices = scores.topk(k, dim=-1)
    return values, indices


def measure(experts: int, threads: int, rounds: int) -> dict:
    from timm.layers import Mlp

    import visionmoe.moe.gating as gating
    from visionmoe.bench.cases import moe_layer

    fast_below, fast_top = gating.FAST_SOFTMAX_BELOW, gating.top_k
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(128, 50, 64)
    dense, moe = Mlp(64, 256), moe_layer(64, 256, experts, 1)

    def use(new: bool) -> None:
        gating.FAST_SOFTMAX_BELOW, gating.top_k = (fast_below, fast_top) if new else (0, _plain_top_k)

    def train(m, new: bool) -> None:
        use(new)
        y = m(x.detach().requires_grad_(True))
        loss = y.pow(2).mean() + (m.last.aux_loss if getattr(m, "last", None) is not None else 0)
        loss.backward()

    def infer(m, new: bool) -> None:
        use(new)
        with torch.no_grad():
            m(x)

    cases = {"fwdbwd dense": lambda: train(dense, False), "fwdbwd old": lambda: train(moe, False),
             "fwdbwd new": lambda: train(moe, True), "fwd dense": lambda: infer(dense, False),
             "fwd old": lambda: infer(moe, False), "fwd new": lambda: infer(moe, True)}
    times: dict[str, list[float]] = {k: [] for k in cases}
    try:
        for r in range(rounds + 3):  # 3 warm-up rounds
            for name, f in cases.items():
                t0 = time.perf_counter()
                f()
                if r >= 3:
                    times[name].append(time.perf_counter() - t0)
    finally:
        use(True)

    def ratio(a: str, b: str) -> float:
        return round(statistics.median(p / q for p, q in zip(times[a], times[b])), 3)

    return {mode: {"old/dense": ratio(f"{mode} old", f"{mode} dense"),
                   "new/dense": ratio(f"{mode} new", f"{mode} dense"),
                   "new/old": ratio(f"{mode} new", f"{mode} old")} for mode in ("fwd", "fwdbwd")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=positive_int, nargs="+", default=[4, 8, 16])
    p.add_argument("--threads", type=positive_int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=positive_int, default=30)
    a = p.parse_args()
    print("| threads | E | fwd old / dense | fwd new / dense | fwd new / old | fwd+bwd old / dense "
          "| fwd+bwd new / dense | fwd+bwd new / old |\n|---|---|---|---|---|---|---|---|")
    for t in a.threads:
        for e in a.experts:
            r = measure(e, t, a.rounds)
            f, b = r["fwd"], r["fwdbwd"]
            print(f"| {t} | {e} | {f['old/dense']} | {f['new/dense']} | {f['new/old']} | {b['old/dense']} | "
                  f"{b['new/dense']} | {b['new/old']} |", flush=True)


if __name__ == "__main__":
    main()
