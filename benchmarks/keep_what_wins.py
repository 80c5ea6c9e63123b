"""Does each CPU speed mechanism win where users run? (issue 31, item 5; docs/performance.md,
"Keep only what wins").

Two parts, each printed as a table and written to ``--out`` as JSON:

1. **The expert threads** (in one process, interleaved rounds, torch on 2 threads): every MoE
   case twice, with its experts in the compiled loop (``threads="native"``) and one after
   another (``False``, every op on both threads; the Python thread pool that was the third
   mode lost in three runs and was removed), at the shapes users run: the bench's D = 384
   layer (top-1, image-level, top-2 with E = 8; top-1 with E = 64), the recipes' D = 64
   layer (E = 4 and 16), the recipes' small ViT training step and the ViT-S/16 training step
   (batch 8). Reported: the paired
   ratio of each mode to the serial loop in the same round (median, IQR). At one thread
   every mode runs the serial loop (``kernels.threads``: threads need ``nt >= 2``), so there
   is nothing to compare there.
2. **The allocator tuning** (``VISIONMOE_MALLOC``): child processes alternate between glibc's
   defaults and ``tuned``, each timing the dense MLP, top-1 E = 8 and E = 64 at D = 384, the
   small ViT's train step (dense and MoE) and the ViT-S/16 step; reported: the median over
   process pairs of tuned / default.

    python benchmarks/keep_what_wins.py --rounds 10 --procs 3 --out runs/keep/run1.json  # ~7 min
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from _args import positive_int  # benchmarks/_args.py (this script runs as a file)

MODES = (("native", "native"), (False, "serial"))


def _quartiles(xs: list[float]) -> list[float]:
    if len(xs) < 2:
        return [xs[0]] * 3
    return statistics.quantiles(xs, n=4)


def threads_part(rounds: int) -> dict:
    import torch
    from timm.layers import Mlp

    from visionmoe.bench.cases import _set_threads, _step_case, layer_case, moe_layer, tiny_vit, vit_cases
    from visionmoe.bench.measure import run_rounds
    from visionmoe.moe import native

    if native.load() is None:
        raise SystemExit(f"keep_what_wins.py: the compiled expert loop is needed: {native.status()}")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    suites: dict[str, list] = {}

    def layers(label: str, batch: int, tokens: int, dim: int, hidden: int, shapes: dict) -> None:
        x = torch.randn(batch, tokens, dim)
        cases = [layer_case(f"{label} dense", label, Mlp(dim, hidden), x)]  # names unique over suites
        for name, (e, k, level) in shapes.items():
            for mode, tag in MODES:
                m = moe_layer(dim, hidden, e, k, level=level, threads=mode)
                cases.append(layer_case(f"{label}: {name} {tag}", label, m, x, aux=lambda m=m: m.last.aux_loss))
        suites[label] = cases

    layers("D=384 layer", 64, 65, 384, 1536, {"top-1 E=8": (8, 1, "token"), "image-level E=8": (8, 1, "image"),
                                              "top-2 E=8": (8, 2, "token"), "top-1 E=64": (64, 1, "token")})
    layers("D=64 layer", 128, 50, 64, 256, {"top-1 E=4": (4, 1, "token"), "top-1 E=16": (16, 1, "token"),
                                            "image-level E=4": (4, 1, "image"), "top-2 E=4": (4, 2, "token")})
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    tiny = [_step_case("small ViT dense", "small ViT step", tiny_vit(), x, y)]
    for mode, tag in MODES:
        model = _set_threads(tiny_vit({"num_experts": 4, "top_k": 1, "placement": "last_2"}), mode)
        tiny.append(_step_case(f"small ViT MoE E=4 top-1 {tag}", "small ViT step", model, x, y))
    suites["small ViT step"] = tiny
    vit = vit_cases(batch=8, img_size=224, experts=8, threads=False)
    vit[0].name, vit[1].name = "ViT-S/16 dense", "ViT-S/16 MoE every-2 top-1 serial"
    for mode, tag in MODES[:-1]:
        c = vit_cases(batch=8, img_size=224, experts=8, threads=mode)[1]
        c.name = f"ViT-S/16 MoE every-2 top-1 {tag}"
        vit.append(c)
    suites["ViT-S/16 step"] = vit
    cases = [c for s in suites.values() for c in s]
    print(f"threads: {len(cases)} cases x {rounds} rounds ...", file=sys.stderr, flush=True)
    run_rounds(cases, rounds, ("fwdbwd",), inner=1)
    out: dict = {}
    for label, cs in suites.items():
        times = {c.name: c.times["fwdbwd"] for c in cs}
        rows = out[label] = {}
        dense = next(v for k, v in times.items() if k.endswith("dense"))
        for name, ts in times.items():
            if not name.endswith(" serial"):
                continue
            base = name[: -len(" serial")]
            for _, tag in MODES:
                t = times[f"{base} {tag}"]
                per = [a / b for a, b in zip(t, ts)]
                q = _quartiles(per)
                rows[f"{base} {tag}"] = {"ms": round(statistics.median(t) * 1e3, 2),
                                         "vs_serial": round(statistics.median(per), 3),
                                         "vs_serial_iqr": [round(q[0], 3), round(q[2], 3)],
                                         "vs_dense": round(statistics.median(
                                             [a / b for a, b in zip(t, dense)]), 3)}
    return out


def allocator_child(rounds: int) -> dict:
    """One process's medians (ms) of the allocator cases, with whatever VISIONMOE_MALLOC says."""
    from visionmoe.runtime import allocator_setting, tune_cpu_allocator

    # as the visionmoe program: tuned unless VISIONMOE_MALLOC=default
    allocator = allocator_setting(os.environ.get("VISIONMOE_MALLOC", ""), name="VISIONMOE_MALLOC") and \
        tune_cpu_allocator()
    import torch
    from timm.layers import Mlp

    from visionmoe.bench.cases import _step_case, layer_case, moe_layer, tiny_vit, vit_cases
    from visionmoe.bench.measure import run_rounds

    torch.set_num_threads(2)
    torch.manual_seed(0)
    x = torch.randn(64, 65, 384)
    cases = [layer_case("D=384 dense", "a", Mlp(384, 1536), x)]
    for name, e in (("D=384 top-1 E=8", 8), ("D=384 top-1 E=64", 64)):
        m = moe_layer(384, 1536, e, 1)
        cases.append(layer_case(name, "a", m, x, aux=lambda m=m: m.last.aux_loss))
    xi, yi = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    cases.append(_step_case("small ViT dense step", "a", tiny_vit(), xi, yi))
    cases.append(_step_case("small ViT MoE step", "a", tiny_vit({"num_experts": 4, "top_k": 1,
                                                                 "placement": "last_2"}), xi, yi))
    dense, moe = vit_cases(batch=8, img_size=224, experts=8)
    dense.name, moe.name = "ViT-S/16 dense step", "ViT-S/16 MoE step"
    cases += [dense, moe]
    run_rounds(cases, rounds, ("fwdbwd",), inner=1)
    return {"allocator": allocator, "ms": {c.name: round(statistics.median(c.times["fwdbwd"]) * 1e3, 2)
                                           for c in cases},
            "page_faults": {c.name: round(statistics.median(c.faults["fwdbwd"])) for c in cases if c.faults["fwdbwd"]}}


def allocator_part(rounds: int, procs: int) -> dict:
    pairs = []
    for i in range(procs):
        pair = {}
        for setting in (("default", "tuned") if i % 2 == 0 else ("tuned", "default")):
            print(f"allocator: process {2 * i + len(pair) + 1} of {2 * procs} ({setting}) ...", file=sys.stderr,
                  flush=True)
            env = {**os.environ, "VISIONMOE_MALLOC": setting}
            r = subprocess.run([sys.executable, __file__, "--child", "--rounds", str(rounds)], env=env,
                               capture_output=True, text=True, check=True)
            child = json.loads(r.stdout.strip().splitlines()[-1])
            pair[setting], pair[f"{setting}_page_faults"] = child["ms"], child["page_faults"]
        pairs.append(pair)
    names = list(pairs[0]["default"])
    return {"pairs": pairs, "tuned_over_default": {
        n: round(statistics.median([p["tuned"][n] / p["default"][n] for p in pairs]), 3) for n in names},
            "page_faults": {s: {n: statistics.median([p[f"{s}_page_faults"][n] for p in pairs]) for n in names}
                            for s in ("default", "tuned")}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=positive_int, default=10, help="interleaved rounds")
    p.add_argument("--procs", type=positive_int, default=3, help="process pairs of the allocator part")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--no-allocator", action="store_true", help="only the expert-threads part")
    p.add_argument("--no-threads", action="store_true", help="only the allocator part")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(allocator_child(a.rounds)))
        return 0
    from visionmoe.runtime import tune_cpu_allocator

    if a.no_threads and a.no_allocator:
        p.error("--no-threads and --no-allocator leave nothing to run: drop one")
    tune_cpu_allocator()
    res: dict = {}
    if not a.no_threads:
        res["threads"] = threads_part(a.rounds)
        print("| case (2 threads) | ms | / serial [IQR] | / dense |\n|---|---|---|---|")
        for rows in res["threads"].values():
            for name, r in rows.items():
                iqr = r["vs_serial_iqr"]
                print(f"| {name} | {r['ms']:.1f} | {r['vs_serial']:.3f} [{iqr[0]:.3f}, {iqr[1]:.3f}] "
                      f"| {r['vs_dense']:.3f} |")
    if not a.no_allocator:
        res["allocator"] = allocator_part(max(2, a.rounds // 2), a.procs)
        faults = res["allocator"]["page_faults"]
        print("\n| case (2 threads) | tuned / default (median of process pairs) | page faults per call, default "
              "/ tuned |\n|---|---|---|")
        for n, r in res["allocator"]["tuned_over_default"].items():
            print(f"| {n} | {r:.3f} | {faults['default'][n]:.0f} / {faults['tuned'][n]:.0f} |")
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
