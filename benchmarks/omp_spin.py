"""Does a shorter OpenMP spin (GOMP_SPINCOUNT) make MoE layers cheaper? (docs/performance.md)

libgomp reads GOMP_SPINCOUNT when torch loads it, so each setting needs its own process:
this script starts ``--reps`` rounds of one child process per setting, in alternating
order, each timing the dense MLP, MoE layers and (``--vit``) a ViT-S/16 training step in
interleaved rounds, and prints the medians over the children of the per-child paired
ratios and times. The experts run on the Python thread pool (``VISIONMOE_NATIVE=0`` in the
children), whose worker the spin competes with.

    python benchmarks/omp_spin.py --reps 5 --rounds 12 --vit      # about 20 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

from _args import positive_int  # benchmarks/_args.py (this script runs as a file)

DENSE_VIT = "vit-s16-dense"  # the dense ViT case of visionmoe.bench.vit_cases


def child(rounds: int, vit: bool) -> dict:
    """Paired ratios and median times of the bench's own cases (visionmoe.bench), one process."""
    from visionmoe.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    import torch
    from timm.layers import Mlp

    from visionmoe.bench.cases import layer_case as _layer_case
    from visionmoe.bench.cases import moe_layer as _moe
    from visionmoe.bench.cases import vit_cases

    torch.set_num_threads(2)
    torch.manual_seed(0)
    dim, hidden = 384, 1536
    x = torch.randn(64, 65, dim)
    layers = {"dense": Mlp(dim, hidden), "top-1": _moe(dim, hidden, 8, 1),
              "image-level": _moe(dim, hidden, 8, 1, level="image"), "top-2": _moe(dim, hidden, 8, 2),
              "E=64": _moe(dim, hidden, 64, 1)}
    cases = {k: _layer_case(k, "layers", m, x, aux=None if k == "dense" else (lambda m=m: m.last.aux_loss)).make(True)
             for k, m in layers.items()}
    if vit:
        cases.update({c.name: c.make(True) for c in vit_cases(batch=8, img_size=224, experts=8)})
    for f in cases.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        order = list(cases)
        random.shuffle(order)
        for k in order:
            t0 = time.perf_counter()
            cases[k]()
            times[k].append(time.perf_counter() - t0)
    res = {}
    for k, ts in times.items():
        ref = times[DENSE_VIT if k.startswith("vit") else "dense"]
        res[k] = {"ms": statistics.median(ts) * 1e3, "ratio": statistics.median(a / b for a, b in zip(ts, ref))}
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", default="unset,10000,0", help="GOMP_SPINCOUNT values; 'unset': libgomp's default")
    p.add_argument("--reps", type=positive_int, default=3, help="child processes per setting")
    p.add_argument("--rounds", type=positive_int, default=12, help="interleaved rounds in each child")
    p.add_argument("--vit", action="store_true", help="also time a ViT-S/16 training step, dense and MoE")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.rounds, a.vit)))
        return
    settings = a.settings.split(",")
    runs: dict[str, list[dict]] = {s: [] for s in settings}
    for rep in range(a.reps):
        for s in settings if rep % 2 == 0 else settings[::-1]:  # alternate the order: drift hits all alike
            env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
            env["VISIONMOE_NATIVE"] = "0"  # the Python pool, not the compiled loop
            if s != "unset":
                env["GOMP_SPINCOUNT"] = s
            cmd = [sys.executable, __file__, "--child", "--rounds", str(a.rounds)] + (["--vit"] if a.vit else [])
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            runs[s].append(json.loads(out.strip().splitlines()[-1]))
            print(f"rep {rep + 1}/{a.reps} GOMP_SPINCOUNT={s} done", file=sys.stderr)
    names = list(runs[settings[0]][0])
    moe_names = [n for n in names if n not in ("dense", DENSE_VIT)]
    print("| GOMP_SPINCOUNT | " + " | ".join(f"{n} ratio" for n in moe_names)
          + " | " + " | ".join(f"{n} ms" for n in names) + " |")
    print("|---" * (2 * len(names) - 1) + "|")
    for s, rs in runs.items():
        ratios = [f"{statistics.median(r[n]['ratio'] for r in rs):.3f}" for n in moe_names]
        ms = [f"{statistics.median(r[n]['ms'] for r in rs):.0f}" for n in names]
        print(f"| {s} | " + " | ".join(ratios) + " | " + " | ".join(ms) + " |")


if __name__ == "__main__":
    main()
