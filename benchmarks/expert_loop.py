"""The compiled expert loop against the Python thread pool and the serial loop (docs/performance.md).

Times, in one process and interleaved rounds (visionmoe.bench's own cases and timer), the
dense MLP and MoE layers whose experts run in the compiled loop (``threads="native"``), on
the Python thread pool (``"python"``) and one after another (``False``): top-1, image-level
top-1, top-2 (E = 8) and top-1 with E = 64, forward + backward; with ``--vit`` also a
ViT-S/16 training step, dense and MoE (every-2, top-1) with either loop. Prints the paired
ratios to dense (median of per-round ratios, interquartile range).

    visionmoe build-native && python benchmarks/expert_loop.py --rounds 20 --vit   # about 12 minutes
"""

from __future__ import annotations

import argparse
import sys

from _args import positive_int  # benchmarks/_args.py (this script runs as a file)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=positive_int, default=20, help="interleaved rounds")
    p.add_argument("--vit", action="store_true", help="also a ViT-S/16 training step, dense and MoE")
    a = p.parse_args(argv)
    from visionmoe.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    import torch
    from timm.layers import Mlp

    from visionmoe.bench.cases import layer_case as _layer_case
    from visionmoe.bench.cases import moe_layer as _moe
    from visionmoe.bench.cases import vit_cases
    from visionmoe.bench.measure import run_rounds as _run_rounds
    from visionmoe.bench.measure import summarise as _summarise
    from visionmoe.moe import native

    if native.load() is None:
        print(f"expert_loop.py: the compiled expert loop is needed: {native.status()}", file=sys.stderr)
        return 2
    torch.set_num_threads(2)
    torch.manual_seed(0)
    dim, hidden = 384, 1536
    x = torch.randn(64, 65, dim)
    layers = {"dense": Mlp(dim, hidden)}
    for mode, label in (("native", "native"), ("python", "python"), (False, "serial")):
        layers[f"top-1 {label}"] = _moe(dim, hidden, 8, 1, threads=mode)
        layers[f"image-level {label}"] = _moe(dim, hidden, 8, 1, level="image", threads=mode)
        layers[f"top-2 {label}"] = _moe(dim, hidden, 8, 2, threads=mode)
        layers[f"E=64 {label}"] = _moe(dim, hidden, 64, 1, threads=mode)
    suites = [[_layer_case(k, "layer", m, x, aux=None if k == "dense" else (lambda m=m: m.last.aux_loss))
               for k, m in layers.items()]]
    if a.vit:
        dense, moe = vit_cases(batch=8, img_size=224, experts=8, threads="native")
        pool = vit_cases(batch=8, img_size=224, experts=8, threads="python")[1]
        moe.name, pool.name = "vit-s16-moe native", "vit-s16-moe python"
        suites.append([dense, moe, pool])
    cases = [c for s in suites for c in s]
    print(f"{len(cases)} cases x {a.rounds} rounds ...", file=sys.stderr)
    _run_rounds(cases, a.rounds, ("fwdbwd",), inner=1)
    print("| case | ms | paired ratio to dense [IQR] |\n|---|---|---|")
    for s in suites:
        for r in _summarise(s, 1):
            iqr = r.get("fwdbwd_paired_iqr", [1.0, 1.0])
            print(f"| {r['name']} | {r['fwdbwd_ms']:.0f} | {r.get('fwdbwd_paired_ratio', 1.0):.3f} "
                  f"[{iqr[0]:.3f}, {iqr[1]:.3f}] |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
