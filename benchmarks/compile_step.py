"""Eager vs ``torch.compile`` training step of the small ViT or ViT-S/16 (dense and MoE).

Each case runs in a process of its own (torch.compile caches compiled code per model class, so
two compiled copies in one process would share it): ``--reps`` rounds of one process per case,
in alternating order; each times ``--steps`` steps after two warm-up steps (compilation). The
MoE model is compiled plainly (graph breaks at the per-expert sizes) and under
``visionmoe.moe.compile_settings()`` (one graph). Prints medians over the reps of the step time
and of its ratio to the same rep's eager step:

    python benchmarks/compile_step.py --reps 3 --steps 20 --threads 1     # about 6 minutes on 2 cores
    python benchmarks/compile_step.py --model vit-s16 --reps 1 --steps 5 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time

import torch

CASES = ("dense eager", "dense compiled", "moe eager", "moe compiled (graph breaks)", "moe compiled (one graph)")


def build(model_name: str, moe: bool, batch: int):
    """The bench's models (``visionmoe.bench.cases``) with an input batch: the recipes' small ViT
    (MoE: 4 experts, top-1, last 2 blocks, dropless as the recipes) or ViT-S/16 (MoE: 8 experts,
    top-1, every 2nd block, dropless as the bench's ``vit_cases``)."""
    from visionmoe.bench.cases import tiny_vit
    from visionmoe.models import create_model

    if model_name == "tiny":
        model = tiny_vit(dict(num_experts=4, top_k=1, placement="last_2") if moe else None)
        return model, torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    model = create_model("vit_small_patch16_224", moe=dict(num_experts=8, top_k=1, placement="every_2") if moe
                         else None)
    return model, torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))


def run_case(name: str, steps: int, batch: int, threads: int, model_name: str = "tiny") -> dict:
    from visionmoe.moe import collect_aux_loss, compile_settings

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, x, y = build(model_name, name.startswith("moe"), batch)
    model.train()
    fn = torch.compile(model) if "compiled" in name else model
    ctx = compile_settings if "one graph" in name else contextlib.nullcontext
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        with ctx():
            loss = torch.nn.functional.cross_entropy(fn(x), y) + collect_aux_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    step()
    step()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return {"step_ms": (time.perf_counter() - t0) / steps * 1000, "warmup_s": warm}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="timed steps per process")
    p.add_argument("--model", choices=("tiny", "vit-s16"), default="tiny",
                   help="the recipes' small ViT (default) or ViT-S/16 at 224 px")
    p.add_argument("--batch", type=int, default=None, help="default: 128 (tiny), 8 (vit-s16)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.batch = args.batch or (128 if args.model == "tiny" else 8)
    if args.case:
        print(json.dumps(run_case(args.case, args.steps, args.batch, args.threads, args.model)))
        return
    res: dict[str, list[dict]] = {c: [] for c in CASES}
    for rep in range(args.reps):
        for c in CASES if rep % 2 == 0 else reversed(CASES):
            out = subprocess.run([sys.executable, __file__, "--case", c, "--steps", str(args.steps), "--batch",
                                  str(args.batch), "--threads", str(args.threads), "--model", args.model],
                                 capture_output=True, text=True, check=True)
            res[c].append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = {}
    for c, runs in res.items():
        base = res["dense eager" if c.startswith("dense") else "moe eager"]
        rows[c] = {"step_ms": round(statistics.median(r["step_ms"] for r in runs), 1),
                   "vs_eager": round(statistics.median(r["step_ms"] / b["step_ms"] for r, b in zip(runs, base)), 3),
                   "first_two_steps_s": round(statistics.median(r["warmup_s"] for r in runs), 1)}
    print(json.dumps({"model": args.model, "threads": args.threads, "batch": args.batch, "reps": args.reps,
                      "steps": args.steps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
