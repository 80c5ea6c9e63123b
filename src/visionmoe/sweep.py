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

__all__ = ["parse_grid", "load_variants", "flops_per_image", "inference_throughput", "run_sweep", "summarize_seeds",
           "paired_to_reference", "run_layer_scan"]


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


def load_variants(path: str | Path) -> dict[str, dict[str, Any]]:
    """A variants file: a YAML mapping of a name to the dotted overrides that make it, e.g.
    ``top2: {moe.top_k: 2}``; each variant is trained at every grid point."""
    from .train.config import load_yaml_dict

    d = load_yaml_dict(path)
    for name, ov in d.items():
        if not isinstance(ov, dict) or not all(isinstance(k, str) for k in ov):
            raise ConfigError(f"variants file {path}: {name!r} must map dotted keys to values, e.g. "
                              "top2: {moe.top_k: 2}")
    return {str(k): dict(v) for k, v in d.items()}


def _digest(d: dict) -> str:
    """A short hash of a point's config, leaving out the keys a resume may change (display,
    threads, device: :func:`~visionmoe.train.persist.resume_safe`), as a run's resume does."""
    import hashlib

    from .train.persist import flat_config, resume_safe

    kept = {k: v for k, v in flat_config(json.loads(json.dumps(d, default=str))).items() if not resume_safe(k)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_sweep(base: dict, grid: dict[str, list], *, variants: dict[str, dict] | None = None,
              out: str | Path = "runs/sweep", progress: bool = True, resume: bool = False) -> list[dict]:
    """Train every point of ``grid`` (a product over keys) on top of the ``base`` config dict,
    for each of ``variants`` (name -> dotted overrides, see :func:`load_variants`) if given;
    returns the rows and writes ``sweep.csv``, ``sweep.json`` and ``sweep.md`` to ``out``
    (with ``run.seed`` in the grid, ``sweep.md`` is mean ± std over the seeds).
    ``resume=True`` keeps the rows an earlier call finished with the same config per point
    and trains the rest; a point whose config changed is refused naming it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    points = [dict(zip(grid, vals)) for vals in itertools.product(*grid.values())] or [{}]
    named = [(name, ov) for name, ov in (variants or {}).items()] or [(None, {})]
    jobs = []
    for name, ov in named:  # validate every point before training any
        for p in points:
            d = apply_overrides(base, [f"{k}={json.dumps(v)}" for k, v in {**ov, **p}.items()])
            d.setdefault("run", {})["progress"] = progress
            cfg = config_from_dict(d)
            row0 = ({"variant": name} if name is not None else {}) | p
            jobs.append((row0, cfg, _digest(d)))
    done = _finished_rows(out, resume)
    rows = []
    for i, (row0, cfg, digest) in enumerate(jobs):
        name = _run_name(row0)
        old = done.get(name)
        if old is not None:
            if old.get("config_digest") != digest:
                raise ConfigError(f"cannot resume {out}: point {name} was trained with another config; run "
                                  "without --resume into another --out")
            rows.append(old)
            continue
        if progress:
            print(f"[{i + 1}/{len(jobs)}] {name}")
        t = Trainer(cfg, run_dir=out / name)
        summary = t.fit(overwrite=True)
        x = t.test_inputs(64)
        params = count_parameters(t.model)
        rows.append({**row0, "test_acc": summary["test_acc"], "params": params["total"],
                     "active_params": params.get("active", params["total"]),
                     "gflops_per_image": flops_per_image(t.model, x[:8]) / 1e9,
                     "img_per_s": inference_throughput(t.model, x), "train_min": summary["train_seconds"] / 60,
                     "config_digest": digest})
        _write(out, rows, None)
    if rows:
        _write(out, rows, pixel_baseline(base, out))
    return rows


def pixel_baseline(base: dict, out: Path | None = None) -> float | None:
    """The number anyone can compute beside a sweep: a linear probe
    (:func:`~visionmoe.eval.linear_probe`) on the raw pixels of the base config's training
    images, tested on its test images; ``None`` for a streamed folder (not in memory). Cached
    in ``out/pixel_baseline.json`` keyed by the data section."""
    from ._utils import atomic_write_bytes
    from .data import TensorSplits, load_dataset
    from .eval import linear_probe

    data = base.get("data") or {}
    key = json.dumps({"name": data.get("name"), "args": data.get("args") or {}}, sort_keys=True)
    cache = Path(out) / "pixel_baseline.json" if out is not None else None
    if cache is not None and cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("data") == key:
            return saved["acc"]
    if not data.get("name"):
        return None
    d = load_dataset(data["name"], **(data.get("args") or {}))
    if not isinstance(d, TensorSplits):
        return None
    acc = linear_probe(d.x_train.flatten(1).float(), d.y_train, d.x_test.flatten(1).float(), d.y_test,
                       num_classes=d.num_classes)
    if cache is not None:
        atomic_write_bytes(cache, json.dumps({"data": key, "acc": acc}).encode())
    return acc


def _finished_rows(out: Path, resume: bool) -> dict[str, dict]:
    path = out / "sweep.json"
    if not resume or not path.exists():
        return {}
    try:
        rows = json.loads(path.read_text())
        return {_run_name({k: v for k, v in r.items() if k not in _METRICS}): r for r in rows}
    except (ValueError, AttributeError, TypeError):
        raise ConfigError(f"cannot resume from {path}: not a sweep's rows; run without --resume") from None


#: the measured columns of a sweep row (the rest name its point)
_METRICS = ("test_acc", "params", "active_params", "gflops_per_image", "img_per_s", "train_min", "config_digest",
            "layers", "routing_degree")
_FMT = {"test_acc": "{:.4f}", "gflops_per_image": "{:.4f}", "img_per_s": "{:.0f}", "train_min": "{:.1f}",
        "params": "{:,}", "active_params": "{:,}"}


def summarize_seeds(rows: list[dict], seed_key: str = "run.seed") -> list[dict]:
    """The rows grouped by every point column except ``seed_key``: per group ``n`` and, per
    measured column, ``{"mean", "std", "n"}`` (:func:`~visionmoe._utils.mean_std`)."""
    from ._utils import mean_std

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = tuple((k, json.dumps(v)) for k, v in r.items() if k not in _METRICS and k != seed_key)
        groups.setdefault(key, []).append(r)
    out = []
    for key, rs in groups.items():
        g = {k: json.loads(v) for k, v in key}
        g |= {m: mean_std([r[m] for r in rs]) for m in _METRICS if m in rs[0] and m != "config_digest"}
        g["seeds"] = [r.get(seed_key) for r in rs]
        out.append(g)
    return out


def paired_to_reference(rows: list[dict], metric: str = "test_acc", seed_key: str = "run.seed") -> dict[str, dict]:
    """Per variant after the first (the reference, e.g. ``dense``), the seed-paired difference
    of ``metric`` to the reference (:func:`visionmoe.eval.stats.paired_difference`: mean,
    95 % t interval, verdict), at the same other grid values; seeds missing in either are
    left out."""
    from .eval.stats import paired_difference

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    ref, out = variants[0], {}
    others = [k for k in rows[0] if k not in _METRICS and k not in ("variant", seed_key)]

    def key(r):
        return tuple(json.dumps(r.get(k)) for k in others), r.get(seed_key)

    base = {key(r): r[metric] for r in rows if r["variant"] == ref}
    for v in variants[1:]:
        pairs = [(r[metric], base[key(r)]) for r in rows if r["variant"] == v and key(r) in base]
        if pairs:
            out[f"{v} - {ref}"] = paired_difference([a for a, _ in pairs], [b for _, b in pairs])
    return out


def _paired_lines(rows: list[dict]) -> list[str]:
    from .eval.stats import format_difference

    paired = paired_to_reference(rows)
    if not paired:
        return []
    return ["", "Test accuracy, seed-paired difference to the first variant (95% t interval; *reproduced* / "
            "*refuted* only where the interval excludes 0):", ""] + [f"- {k}: {format_difference(d)}"
                                                                    for k, d in paired.items()]


def _write(out: Path, rows: list[dict], pixels: float | None = None, extra: list[str] | None = None) -> None:
    import io

    from ._utils import atomic_write_bytes, fmt_mean_std

    keys = [k for k in rows[0] if k != "config_digest"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(out / "sweep.csv", buf.getvalue().encode())
    atomic_write_bytes(out / "sweep.json", json.dumps(rows, indent=2).encode())
    if "run.seed" in keys:  # mean ± std over the seeds, one line per point
        groups = summarize_seeds(rows)
        gkeys = [k for k in groups[0] if k != "seeds"]
        lines = ["| " + " | ".join(gkeys) + " | seeds |", "|---" * (len(gkeys) + 1) + "|"]
        cell = {"test_acc": lambda d: fmt_mean_std(d, 4)}
        lines += ["| " + " | ".join(cell[k](g[k]) if k in cell else
                                    _FMT.get(k, "{}").format(g[k]["mean"]) if isinstance(g[k], dict) and "mean" in g[k]
                                    else str(g[k]) for k in gkeys) + f" | {len(g['seeds'])} |" for g in groups]
    else:
        lines = ["| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"]
        lines += ["| " + " | ".join(_FMT.get(k, "{}").format(r[k]) for k in keys) + " |" for r in rows]
    if "run.seed" in keys and "variant" in keys:
        lines += _paired_lines(rows)
    lines += extra or []
    if pixels is not None:
        lines += ["", f"raw pixels, linear probe on the same training images: {pixels:.4f}"]
    atomic_write_bytes(out / "sweep.md", ("\n".join(lines) + "\n").encode())


def _scan_paired_lines(rows: list[dict], shared: tuple[bool, ...]) -> list[str]:
    """Seed-paired test-accuracy differences of the layer scan: MoE in the last L blocks minus
    the dense model (L = 0), and with minus without the shared expert at every L >= 1."""
    from .eval.stats import format_difference, paired_difference

    acc = {(r["layers"], r["moe.shared_expert"], r["run.seed"]): r["test_acc"] for r in rows}
    seeds = sorted({k[2] for k in acc})
    depth = max(k[0] for k in acc)

    def diff(a: tuple, b: tuple) -> str:
        pairs = [(acc[a + (sd,)], acc[b + (sd,)]) for sd in seeds if a + (sd,) in acc and b + (sd,) in acc]
        return format_difference(paired_difference([x for x, _ in pairs], [y for _, y in pairs]))

    lines = ["", "Test accuracy, seed-paired differences (95% t interval; *reproduced* only where the interval "
             "excludes 0 in the direction named first, *refuted* the other way):", ""]
    for n in range(1, depth + 1):
        for s in shared:
            lines.append(f"- L={n}, {'with' if s else 'without'} shared expert - dense: {diff((n, s), (0, s))}")
        if len(shared) == 2:
            lines.append(f"- L={n}, with - without shared expert: {diff((n, True), (n, False))}")
    return lines


def run_layer_scan(base: dict, depth: int, *, shared: tuple[bool, ...] = (False, True),
                   seeds: list[int] | None = None, out: str | Path = "runs/scan", progress: bool = True,
                   resume: bool = False) -> list[dict]:
    """ViMoE's layer scan: MoE in the last L blocks for L = 0..depth, with and without the shared
    expert; adds the routing degree ``C(N, k)^L`` to every row and plots accuracy and degree
    against L (``layer_scan.png``). ``seeds``: train every point once per seed (``run.seed``);
    ``sweep.md`` then has mean ± std per point and the seed-paired differences to the dense
    model and between with and without the shared expert, the plot mean ± std."""
    from .analysis import routing_degree

    moe = base.get("moe", {})
    grid = {"moe.placement": [f"last_{n}" for n in range(depth + 1)], "moe.shared_expert": list(shared)}
    if seeds:
        grid["run.seed"] = list(dict.fromkeys(seeds))
    rows = run_sweep(base, grid, out=out, progress=progress, resume=resume)
    e, k = moe.get("num_experts", 8), moe.get("top_k", 1)
    for r in rows:
        r["layers"] = int(r["moe.placement"].split("_")[1])
        r["routing_degree"] = routing_degree(e, k, r["layers"])
    extra = _scan_paired_lines(rows, shared) if seeds and len(grid["run.seed"]) > 1 else None
    _write(Path(out), rows, pixel_baseline(base, Path(out)), extra)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ._utils import mean_std

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ls = list(range(depth + 1))
    for s in shared:
        stats = [mean_std([r["test_acc"] for r in rows if r["moe.shared_expert"] == s and r["layers"] == n])
                 for n in ls]
        ax.errorbar(ls, [d["mean"] for d in stats], yerr=[d["std"] for d in stats], marker="o", capsize=3,
                    label="with shared expert" if s else "without shared expert")
    ax.set_xlabel("MoE in the last L blocks")
    ax.set_ylabel("test accuracy" + (f" (mean ± std, {len(grid['run.seed'])} seeds)" if seeds else ""))
    ax2 = ax.twinx()
    ax2.semilogy(ls, [routing_degree(e, k, n) for n in ls], color="gray", ls="--", label="routing degree")
    ax2.set_ylabel(f"routing degree C({e},{k})^L")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(Path(out) / "layer_scan.png", dpi=100)
    plt.close(fig)
    return rows
