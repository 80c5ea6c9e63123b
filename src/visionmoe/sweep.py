"""Grid runner for design-space studies (the Sweet-spot paper's tables at small scale):
train every combination of a few config keys and write one table of accuracy, parameters
(total and active per image), FLOPs per image and inference throughput.

``visionmoe sweep CONFIG --grid moe.placement=[every_2,last_2] --grid moe.router=[linear,cosine,l2]``
"""

from __future__ import annotations

import csv
import itertools
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models import count_parameters
from .train import Trainer, config_from_dict
from .train.config import ConfigError, apply_overrides, parse_yaml_value

__all__ = ["parse_grid", "flops_per_image", "inference_throughput", "run_sweep", "run_layer_scan"]


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["moe.top_k=[1,2]", ...]`` -> ``{"moe.top_k": [1, 2]}`` (values parsed as YAML)."""
    grid: dict[str, list] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"grid entry {item!r} must look like key.sub=[v1, v2]")
        key, raw = item.split("=", 1)
        values = parse_yaml_value(raw, f"grid entry {key.strip()}")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid entry {item!r}: give a non-empty list of values, e.g. {key}=[1, 2]")
        grid[key.strip()] = values
    return grid


@torch.no_grad()
def flops_per_image(model: nn.Module, x: torch.Tensor) -> float:
    """Forward FLOPs per image counted by ``torch.utils.flop_counter`` (matmuls and
    convolutions; a MoE counts only the experts its tokens actually visit). The experts run
    with the plain kernel on the calling thread while counting (the counter does not see
    worker threads), so the number does not depend on the thread count or the kernel."""
    from torch.utils.flop_counter import FlopCounterMode

    from .moe.experts import Experts

    was = model.training
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    impls = [m.impl for m in experts]
    model.eval()
    try:
        for m in experts:
            m.impl = "split"
        with FlopCounterMode(display=False) as fc:
            model(x)
    finally:
        for m, impl in zip(experts, impls):
            m.impl = impl
        model.train(was)
    return fc.get_total_flops() / len(x)


@torch.no_grad()
def inference_throughput(model: nn.Module, x: torch.Tensor, reps: int = 3, **kwargs: Any) -> float:
    """Images per second of ``model(x, **kwargs)`` in eval mode (after one warm-up call);
    ``kwargs`` e.g. ``routing_key`` for keyed routers."""
    was = model.training
    model.eval()
    model(x, **kwargs)
    t0 = time.perf_counter()
    for _ in range(reps):
        model(x, **kwargs)
    model.train(was)
    return reps * len(x) / (time.perf_counter() - t0)


def _run_name(point: dict[str, Any]) -> str:
    return "__".join(f"{k.split('.')[-1]}-{v}" for k, v in point.items()).replace("/", "_") or "base"


def run_sweep(base: dict, grid: dict[str, list], *, out: str | Path = "runs/sweep",
              progress: bool = True) -> list[dict]:
    """Train every point of ``grid`` (a product over keys) on top of the ``base`` config dict;
    returns the rows and writes ``sweep.csv``, ``sweep.json`` and ``sweep.md`` to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    points = [dict(zip(grid, vals)) for vals in itertools.product(*grid.values())] or [{}]
    cfgs = []
    for p in points:  # validate every point before training any
        d = apply_overrides(base, [f"{k}={json.dumps(v)}" for k, v in p.items()])
        d.setdefault("run", {})["progress"] = progress
        cfgs.append(config_from_dict(d))
    rows = []
    for i, (p, cfg) in enumerate(zip(points, cfgs)):
        name = _run_name(p)
        if progress:
            print(f"[{i + 1}/{len(points)}] {name}")
        t = Trainer(cfg, run_dir=out / name)
        summary = t.fit(overwrite=True)
        x = t.test_inputs(64)
        params = count_parameters(t.model)
        rows.append({**p, "test_acc": summary["test_acc"], "params": params["total"],
                     "active_params": params.get("active", params["total"]),
                     "gflops_per_image": flops_per_image(t.model, x[:8]) / 1e9,
                     "img_per_s": inference_throughput(t.model, x), "train_min": summary["train_seconds"] / 60})
        _write(out, rows)
    return rows


def _write(out: Path, rows: list[dict]) -> None:
    keys = list(rows[0])
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    (out / "sweep.json").write_text(json.dumps(rows, indent=2))
    fmt = {"test_acc": "{:.4f}", "gflops_per_image": "{:.4f}", "img_per_s": "{:.0f}", "train_min": "{:.1f}",
           "params": "{:,}", "active_params": "{:,}"}
    lines = ["| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"]
    lines += ["| " + " | ".join(fmt.get(k, "{}").format(r[k]) for k in keys) + " |" for r in rows]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")


def run_layer_scan(base: dict, depth: int, *, shared: tuple[bool, ...] = (False, True),
                   out: str | Path = "runs/scan", progress: bool = True) -> list[dict]:
    """ViMoE's layer scan: MoE in the last L blocks for L = 0..depth, with and without the shared
    expert; adds the routing degree ``C(N, k)^L`` to every row and plots accuracy and degree
    against L (``layer_scan.png``)."""
    from .analysis import routing_degree

    moe = base.get("moe", {})
    grid = {"moe.placement": [f"last_{n}" for n in range(depth + 1)], "moe.shared_expert": list(shared)}
    rows = run_sweep(base, grid, out=out, progress=progress)
    e, k = moe.get("num_experts", 8), moe.get("top_k", 1)
    for r in rows:
        r["layers"] = int(r["moe.placement"].split("_")[1])
        r["routing_degree"] = routing_degree(e, k, r["layers"])
    _write(Path(out), rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for s in shared:
        pts = sorted((r["layers"], r["test_acc"]) for r in rows if r["moe.shared_expert"] == s)
        ax.plot(*zip(*pts), marker="o", label="with shared expert" if s else "without shared expert")
    ax.set_xlabel("MoE in the last L blocks")
    ax.set_ylabel("test accuracy")
    ax2 = ax.twinx()
    ls = list(range(depth + 1))
    ax2.semilogy(ls, [routing_degree(e, k, n) for n in ls], color="gray", ls="--", label="routing degree")
    ax2.set_ylabel(f"routing degree C({e},{k})^L")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(Path(out) / "layer_scan.png", dpi=100)
    plt.close(fig)
    return rows
