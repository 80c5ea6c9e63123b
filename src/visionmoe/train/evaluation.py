"""Evaluation as a free function: an objective's test metrics and the routing statistics of a
model over a test set, on any device and any number of processes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..data.streaming import ModelInputs, eval_batches
from ..moe.layer import collect_routing_stats
from .context import RunContext
from .distributed import all_reduce_sums

__all__ = ["evaluate", "routing_stats"]


def routing_stats(model: nn.Module) -> dict[str, dict]:
    fn = getattr(model, "routing_stats", None)
    return fn() if callable(fn) else collect_routing_stats(model)


@torch.no_grad()
def evaluate(model: nn.Module, objective: nn.Module, data: ModelInputs, ctx: RunContext, *, batch_size: int = 512,
             workers: int = 0, expert_parallel: int = 1, loader: Any = None) -> dict[str, Any]:
    """``objective.eval_batch`` sums over ``data`` (each rank a contiguous share) averaged over
    its images (accuracy and loss, masked reconstruction loss with fixed masks, ...), passed
    through ``objective.summarize``, plus ``routing``: each MoE layer's load, dropped fraction
    and gate entropy over the whole set. The masks / views are drawn from a fixed seed, so
    every evaluation of a run is comparable. ``loader``: a prepared :func:`eval_batches` triple
    (the Trainer keeps one with persistent workers)."""
    model.eval()
    objective.eval()
    gen = torch.Generator().manual_seed(1234)  # the same masks / views at every evaluation
    loader, lo, hi = loader or eval_batches(data, batch_size, rank=ctx.dist.rank, world=ctx.dist.world,
                                            workers=workers, pin_memory=ctx.pin_memory)
    if ctx.dist.enabled and hi <= lo:
        raise ValueError(f"{len(data)} test images cannot be shared by {ctx.dist.world} processes")
    sums: dict[str, float] = {}
    loads: dict[str, list] = {}
    n = 0
    n_batches = 0
    first = None
    for batch in loader:
        x, y, *rest = ctx.to_device(batch)
        key = rest[0] if rest else None
        first = first or (x, y, key)
        with ctx.autocast():
            for k, v in objective.eval_batch(model, x, y, key, gen).items():
                sums[k] = sums.get(k, 0.0) + v
        n += len(y)
        n_batches += 1
        for name, s in routing_stats(model).items():
            loads.setdefault(name, []).append((len(y), s))
    if expert_parallel > 1 and first is not None:  # every rank runs as many forwards (the all-to-all is collective)
        share = -(-len(data) // ctx.dist.world)
        for _ in range(-(-share // batch_size) - n_batches):  # extra passes over its first batch, not counted
            with ctx.autocast():
                objective.eval_batch(model, *first, torch.Generator().manual_seed(0))
    flat = {f"m|{k}": v for k, v in sums.items()} | {"n": float(n)}
    for name, items in loads.items():  # image-weighted sums, reduced over the ranks below
        flat[f"r|{name}|w"] = sum(w for w, _ in items)
        for key in ("dropped_fraction", "gate_entropy"):
            flat[f"r|{name}|{key}"] = sum(w * s[key] for w, s in items)
        for e in range(len(items[0][1]["load"])):
            flat[f"r|{name}|load|{e}"] = sum(w * s["load"][e] for w, s in items)
    flat = all_reduce_sums(flat, ctx.dist)
    n = int(flat["n"])
    sums = {k[2:]: v for k, v in flat.items() if k.startswith("m|")}
    routing: dict[str, dict] = {}
    for name in loads:
        total = flat[f"r|{name}|w"]
        routing[name] = {key: flat[f"r|{name}|{key}"] / total for key in ("dropped_fraction", "gate_entropy")}
        num = sum(1 for k in flat if k.startswith(f"r|{name}|load|"))
        routing[name]["load"] = [round(flat[f"r|{name}|load|{e}"] / total, 4) for e in range(num)]
    out = {f"test_{k}": v / max(n, 1) for k, v in sums.items()}
    summarize = getattr(objective, "summarize", None)
    if callable(summarize):
        out = summarize(out)
    return out | {"routing": routing}
