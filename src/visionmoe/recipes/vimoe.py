"""ViMoE study (Han et al. 2024) at CPU scale: pre-train a dense ViT, upcycle it into MoEs
(each expert a copy of the pre-trained FFN, optional shared expert, fresh router) and

- **stability**: MoE in every block, N experts, top-1, image-level (CLS) routing, GShard
  loss 0.01, with and without the shared expert, against fine-tuning the dense ViT;
- **segmentation**: token-level routing with a shared expert (GShard loss 0.001) against the
  dense ViT, a linear head on patch tokens, layer-wise lr decay, mIoU and pixel accuracy on
  pixel-labelled scenes of real images (``digit_scenes`` / ``fashion_scenes``).

Each over several seeds, with a markdown report: tables (mean ± std), test-accuracy curves,
predicted masks over images and token-to-expert maps. ``visionmoe vimoe [--quick] [key=value]``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .._utils import atomic_write_bytes, finish_study, fmt_mean_std, mean_std, save_results, study_progress
from ..data import TensorSplits, load_dataset
from ..train import Trainer, config_from_dict
from .common import study_config

__all__ = ["ViMoEStudyConfig", "run_vimoe_study", "STABILITY_VARIANTS", "SEG_VARIANTS"]

#: ``scratch``: the dense ViT from random initialisation with the same fine-tune (the baseline
#: a pre-trained encoder must beat)
STABILITY_VARIANTS = ("dense", "moe_noshared", "moe_shared", "scratch")
SEG_VARIANTS = ("dense", "moe_token", "scratch")
#: the seed-paired comparisons of the report: (a, b, direction the paper claims, what it tests)
STABILITY_CLAIMS = (("moe_shared", "moe_noshared", 1, "with - without the shared expert (the paper: with is better)"),
                    ("moe_noshared", "dense", 1, "MoE without the shared expert - dense"),
                    ("moe_shared", "dense", 1, "MoE with the shared expert - dense"),
                    ("dense", "scratch", 1, "pre-trained dense - random init"),
                    ("moe_noshared", "scratch", 1, "MoE without the shared expert - random init"),
                    ("moe_shared", "scratch", 1, "MoE with the shared expert - random init"))
SEG_CLAIMS = (("moe_token", "dense", 1, "token-routed MoE - dense"),
              ("dense", "scratch", 1, "pre-trained dense - random init"),
              ("moe_token", "scratch", 1, "token-routed MoE - random init"))


@dataclass
class ViMoEStudyConfig:
    """Defaults: about 20 minutes on 2 CPU cores (5 seeds; 21.8 min measured, 2026-12-04, with other
    work on the cores for part of it). ``parts`` picks ``stability`` and/or
    ``segmentation``; the dense ViT is pre-trained once (classification on
    ``pretrain_data``) and upcycled for every run."""

    # patch 8 at 32 px: 16 tokens, ~3x faster per step than patch 4, so the dense ViT can see all
    # 60,000 Fashion-MNIST images (3 epochs: test acc 0.859, against 0.75
    # for patch 4 on 20,000 images)
    vit: dict = field(default_factory=lambda: dict(patch_size=8, embed_dim=64, depth=6, num_heads=4))
    img_size: int = 32
    pretrain_data: str = "fashion_mnist"
    pretrain_limit: int = 60000
    pretrain_epochs: float = 4.0
    pretrain_lr: float = 2e-3
    # None: horizontal flips for clothes (fashion_mnist), none for digits, whose labels a mirror changes
    pretrain_augment: str | None = None
    pretrained: str | None = None  # a dense checkpoint to upcycle instead of pre-training one
    num_experts: int = 8
    top_k: int = 1
    # renormalize the top-k gates (top-1: weight 1), so an upcycled MoE without the shared expert
    # computes exactly the dense FFN at initialisation; off (V-MoE's default) it starts at
    # gate x FFN, about FFN / N (see docs/vimoe.md)
    renormalize: bool = False
    stability_data: str = "mnist5k"
    # chosen on a validation split (1,000 of mnist5k's training images; docs/vimoe.md, the layer
    # scan's table): 10 epochs without layer decay beat the raw-pixel probe, the former 4 epochs
    # with layer decay 0.65 stayed below it
    stability_epochs: float = 10.0
    stability_lr: float = 2e-3
    stability_layer_decay: float | None = None
    seg_data: str = "fashion_scenes"
    seg_epochs: float = 10.0
    seg_lr: float = 2e-3
    seg_layer_decay: float | None = 0.65
    seg_placement: str = "last_2"
    batch_size: int = 64
    # five seeds: the headline comparisons (shared vs no shared expert, MoE vs dense) are paired over them
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    parts: list[str] = field(default_factory=lambda: ["stability", "segmentation"])

    def __post_init__(self) -> None:
        bad = [p for p in self.parts if p not in ("stability", "segmentation")]
        if bad:
            raise ValueError(f"unknown parts {bad}; choose from ['stability', 'segmentation']")
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")

    @classmethod
    def quick(cls) -> ViMoEStudyConfig:
        return cls(vit=dict(patch_size=8, embed_dim=32, depth=4, num_heads=2), pretrain_limit=10000,
                   pretrain_epochs=3, num_experts=4, stability_epochs=1, seg_epochs=2, seeds=[0])

    @classmethod
    def from_overrides(cls, overrides: list[str] | None = None, *, quick: bool = False) -> ViMoEStudyConfig:
        return study_config(cls, overrides, quick=quick)


def _model(c: ViMoEStudyConfig, moe: dict | None) -> dict:
    return {"name": "vmoe_tiny_patch4_32" if moe else "vit_tiny_patch4_32",
            "args": {"img_size": c.img_size, "in_chans": 1, **c.vit}}


def _run(c: ViMoEStudyConfig, seed: int, **parts) -> dict:
    base = {"data": {"augment": "none", "batch_size": c.batch_size, "img_size": c.img_size, "eval_batch_size": 256},
            "run": {"seed": seed, "progress": False, "print_eval": False, "log_every": 10, "eval_every_epochs": 1,
                    "checkpoint_every": 10**9, "keep_checkpoints": 1,
                    "device": "cpu"}}  # the study's plots and routing analysis work on CPU tensors
    for k, v in parts.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return base


def pretrain_config(c: ViMoEStudyConfig) -> dict:
    """The dense ViT that every run upcycles: classification on ``pretrain_data``."""
    augment = c.pretrain_augment or ("flip" if "fashion" in c.pretrain_data else "none")
    return _run(c, 0, model=_model(c, None), data={"name": c.pretrain_data, "augment": augment},
                optim={"name": "adamw", "lr": c.pretrain_lr, "weight_decay": 0.05, "clip_grad": 1.0},
                schedule={"epochs": c.pretrain_epochs, "warmup_epochs": 0.3},
                run={"eval_every_epochs": 1e9, "keep_checkpoints": 1})


def _init(variant: str, init: str) -> dict:
    """The upcycled / pre-trained start, or none for ``scratch``."""
    return {"init": None} if variant == "scratch" else {"init": init, "init_skip": ["head."]}


def stability_config(c: ViMoEStudyConfig, variant: str, seed: int, init: str) -> dict:
    """MoE in every block, image-level (CLS) routing, with / without the shared expert, or dense
    (pre-trained, or ``scratch``: random initialisation, the same fine-tune)."""
    moe = None if variant in ("dense", "scratch") else {
        "num_experts": c.num_experts, "top_k": c.top_k, "placement": "all", "routing": "cls",
        "shared_expert": variant == "moe_shared", "noise_std": 0.0, "renormalize": c.renormalize,
        "capacity_factor": None,
        "eval_capacity_factor": None, "aux_weights": {"gshard": 0.01}}
    ld = None if variant == "scratch" else c.stability_layer_decay
    return _run(c, seed, model={**_model(c, moe), **_init(variant, init)}, moe=moe or {},
                data={"name": c.stability_data},
                optim={"name": "adamw", "lr": c.stability_lr, "weight_decay": 0.05, "layer_decay": ld,
                       "clip_grad": 1.0},
                schedule={"epochs": c.stability_epochs, "warmup_epochs": 0.3, "min_lr": 1e-6})


def segmentation_config(c: ViMoEStudyConfig, variant: str, seed: int, init: str) -> dict:
    """Token-level routing with a shared expert in ``seg_placement`` blocks (or dense, pre-trained or
    ``scratch``), linear head."""
    moe = None if variant in ("dense", "scratch") else {
        "num_experts": c.num_experts, "top_k": c.top_k, "placement": c.seg_placement, "routing": "token",
        "shared_expert": True, "noise_std": 0.0, "renormalize": c.renormalize, "capacity_factor": None,
        "eval_capacity_factor": None, "aux_weights": {"gshard": 0.001}}
    ld = None if variant == "scratch" else c.seg_layer_decay
    return _run(c, seed, model={**_model(c, moe), **_init(variant, init)}, moe=moe or {},
                data={"name": c.seg_data}, objective="segmentation",
                optim={"name": "adamw", "lr": c.seg_lr, "weight_decay": 0.05, "layer_decay": ld},
                schedule={"epochs": c.seg_epochs, "warmup_epochs": 0.5, "min_lr": 1e-6},
                run={"eval_every_epochs": max(1.0, c.seg_epochs / 4)})


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _curve(run_dir: Path, key: str) -> list[tuple[float, float]]:
    recs = _records(run_dir)
    return [(r["epoch"], r[key]) for r in recs if key in r]


def run_vimoe_study(c: ViMoEStudyConfig | None = None, *, out: str | Path = "runs/vimoe",
                    progress: bool = True) -> dict:
    c = c or ViMoEStudyConfig()
    console, bars = study_progress("ViMoE study", "runs", progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res: dict = {"config": asdict(c), "stability": [], "segmentation": []}
    pre_data = load_dataset(c.pretrain_data)
    if c.pretrain_limit:
        pre_data = TensorSplits(pre_data.name, pre_data.x_train[: c.pretrain_limit],
                                pre_data.y_train[: c.pretrain_limit], pre_data.x_test[:2000], pre_data.y_test[:2000],
                                pre_data.classes)
    jobs = [("stability", v, s) for s in c.seeds for v in STABILITY_VARIANTS if "stability" in c.parts]
    jobs += [("segmentation", v, s) for s in c.seeds for v in SEG_VARIANTS if "segmentation" in c.parts]
    data = {"stability": load_dataset(c.stability_data)} if "stability" in c.parts else {}
    if "segmentation" in c.parts:
        data["segmentation"] = load_dataset(c.seg_data)
    if "stability" in c.parts:  # the baseline anyone can compute on the same images
        from .moce_pipeline import pixel_probe

        res["pixel_probe"] = pixel_probe(data["stability"])
    with bars as bar:
        task = bar.add_task("", total=len(jobs) + 1, stage="pre-training the dense ViT")
        pre = Trainer(config_from_dict(pretrain_config(c)), data=pre_data, run_dir=out / "pretrain_dense")
        if c.pretrained:  # upcycle a given dense checkpoint; report its accuracy on the pre-training task
            pre.load(c.pretrained)
            init, s = c.pretrained, {"test_acc": pre.evaluate()["test_acc"], "train_seconds": 0.0}
        else:
            s = pre.fit(overwrite=True)
            init = str(pre.latest_checkpoint())
        res["pretrain"] = {"checkpoint": init, "test_acc": s["test_acc"], "seconds": s["train_seconds"]}
        bar.console.print(f"dense ViT pre-trained on {c.pretrain_data}: test acc {s['test_acc']:.4f}")
        bar.advance(task)
        builders = {"stability": stability_config, "segmentation": segmentation_config}
        for part, variant, seed in jobs:
            bar.update(task, stage=f"{part}: {variant} seed {seed}")
            rd = out / part / f"{variant}_seed{seed}"
            tr = Trainer(config_from_dict(builders[part](c, variant, seed, init)), data=data[part], run_dir=rd)
            s = tr.fit(overwrite=True)
            rec = {"variant": variant, "seed": seed, "seconds": s["train_seconds"], "img_per_s": s["train_img_per_s"],
                   "params": s["params"]}
            if part == "stability":
                rec |= {"test_acc": s["test_acc"], "curve": _curve(rd, "test_acc"),
                        "loss_std_last_half": _loss_spread(rd)}
                bar.console.print(f"stability {variant} seed {seed}: test acc {s['test_acc']:.4f}")
            else:
                rec |= {"miou": s["test_miou"], "pixel_acc": s["test_pixel_acc"], "iou": s["test_iou"]}
                bar.console.print(f"segmentation {variant} seed {seed}: mIoU {s['test_miou']:.4f}, "
                                  f"pixel acc {s['test_pixel_acc']:.4f}")
                if seed == c.seeds[0]:
                    _segmentation_figures(out, variant, tr)
            res[part].append(rec)
            save_results(out, res, _aggregate)
            bar.advance(task)
    finish_study(out, res, t0, _aggregate, _report, console)
    for w in res["summary"]["warnings"]:
        console.print(f"[bold yellow]warning:[/] {w}")
    return res


def _loss_spread(run_dir: Path) -> float:
    """Standard deviation of the training loss over the second half of the run (a noisy,
    unstable run has a larger one)."""
    losses = [r["loss"] for r in _records(run_dir) if "loss" in r]
    half = losses[len(losses) // 2 :] or losses
    return mean_std(half)["std"] if len(half) > 1 else 0.0


def _paired(runs: list[dict], metric: str, claims) -> dict:
    """Seed-paired differences (95% t interval, verdict) of ``metric`` for every claim whose two
    variants share seeds."""
    from ..eval.stats import paired_difference

    by = {(r["variant"], r["seed"]): r[metric] for r in runs}
    out = {}
    for a, b, direction, label in claims:
        seeds = sorted(s for v, s in by if v == a and (b, s) in by)
        if seeds:
            out[label] = paired_difference([by[a, s] for s in seeds], [by[b, s] for s in seeds], direction=direction)
    return out


def _aggregate(res: dict) -> None:
    summ: dict = {"stability": {}, "segmentation": {}}
    for v in STABILITY_VARIANTS:
        rs = [r for r in res["stability"] if r["variant"] == v]
        if rs:
            summ["stability"][v] = {"test_acc": mean_std(r["test_acc"] for r in rs),
                                    "loss_std_last_half": mean_std(r["loss_std_last_half"] for r in rs),
                                    "worst_seed": min(r["test_acc"] for r in rs), "n": len(rs)}
    for v in SEG_VARIANTS:
        rs = [r for r in res["segmentation"] if r["variant"] == v]
        if rs:
            summ["segmentation"][v] = {"miou": mean_std(r["miou"] for r in rs),
                                       "pixel_acc": mean_std(r["pixel_acc"] for r in rs), "n": len(rs)}
    summ["stability_paired"] = _paired(res["stability"], "test_acc", STABILITY_CLAIMS)
    summ["segmentation_paired"] = _paired(res["segmentation"], "miou", SEG_CLAIMS)
    flags = _warnings(summ, res.get("pixel_probe"))
    summ["warnings"] = [text for _, _, text in flags]
    summ["flagged"] = {part: sorted({v for p, v, _ in flags if p == part}) for part in ("stability", "segmentation")}
    res["summary"] = summ


def _warnings(summ: dict, pixels: float | None) -> list[tuple[str, str, str]]:
    """``(part, variant, line)`` for every pre-trained model that does not beat random
    initialisation (mean over seeds) and every stability model below the raw-pixel probe."""
    out = []
    for part, metric in (("stability", "test_acc"), ("segmentation", "miou")):
        rows = summ[part]
        scratch = rows.get("scratch", {}).get(metric, {}).get("mean")
        for v, a in rows.items():
            m = a[metric]["mean"]
            if v != "scratch" and scratch is not None and m <= scratch:
                out.append((part, v, f"{part}: {v} ({m:.4f}) does not beat the same fine-tune from random init "
                                      f"({scratch:.4f})"))
            if part == "stability" and pixels is not None and m <= pixels:
                label = f"{v} (the random-init baseline, " if v == "scratch" else f"{v} ("
                out.append((part, v, f"stability: {label}{m:.4f}) is not above the raw-pixel linear probe "
                                     f"({pixels:.4f})"))
    return out


@torch.no_grad()
def _segmentation_figures(out: Path, variant: str, tr: Trainer, n: int = 6) -> None:
    """Predicted masks over test images (image, truth, prediction) and, for the MoE, each
    MoE block's first-choice expert per patch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..analysis.report import plot_token_routing
    from ..analysis.routing import collect_routing

    model = tr.model.eval()
    x, y = tr.test_inputs(n).cpu(), tr.data.y_test[:n]
    pred = tr.objective.logits(model, x, y.shape[-2:]).argmax(1)
    k = tr.data.num_classes
    cmap = plt.get_cmap("tab20", max(k, 2))
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5), squeeze=False)
    for i in range(n):
        img = x[i, 0].numpy()
        for row, (m, title) in enumerate([(None, "image"), (y[i], "truth"), (pred[i], variant)]):
            ax = axes[row, i]
            ax.imshow(img, cmap="gray")
            if m is not None:
                shown = torch.where(m == 0, torch.full_like(m, -1), m).float().numpy()
                ax.imshow(shown, cmap=cmap, vmin=0, vmax=k - 1, alpha=(shown >= 0) * 0.6)
            if i == 0:
                ax.set_ylabel(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{variant}: predicted masks over test scenes (colour = class, background clear)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / f"seg_masks_{variant}.png", dpi=90)
    plt.close(fig)
    if getattr(model, "is_moe", False):
        routes = collect_routing(model, x)
        grid = model.patch_embed.grid_size[0]
        plot_token_routing(out / f"seg_routing_{variant}.png", x, {b: r["top1"] for b, r in routes.items()}, grid,
                           model.moe_config.num_experts)


def _paired_lines(paired: dict, metric: str) -> list[str]:
    from ..eval.stats import format_difference

    if not paired:
        return []
    return ["", f"Seed-paired differences of the {metric} (95% t interval; *reproduced* / *refuted* only where "
            "the interval excludes 0):", ""] + [f"- {k}: {format_difference(d)}" for k, d in paired.items()]


def _report(out: Path, res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, summ = res["config"], res["summary"]
    f = fmt_mean_std
    acc = res["pretrain"]["test_acc"]
    pre = (f"The dense ViT `{c['pretrained']}` ({c['vit']}, {c['img_size']} px; test acc {acc:.4f} on "
           f"`{c['pretrain_data']}`)" if c["pretrained"] else
           f"A dense ViT ({c['vit']}, {c['img_size']} px) pre-trained for {c['pretrain_epochs']} epochs on "
           f"{c['pretrain_limit']} `{c['pretrain_data']}` images (test acc {acc:.4f})")
    lines = ["# ViMoE study", "",
             f"{pre} is upcycled: every expert a copy of its FFN, a fresh router, {c['num_experts']} experts, "
             f"top-{c['top_k']}. Seeds {c['seeds']}; mean ± std over seeds; {res.get('seconds', 0) / 60:.1f} min.", ""]
    flagged = summ.get("flagged", {})

    def name(part: str, v: str) -> str:  # a flagged variant in bold
        return f"**{v}**" if v in flagged.get(part, []) else v
    if summ.get("warnings"):
        lines += ["**Warning:** " + "; ".join(summ["warnings"]) + ".", ""]
    if summ["stability"]:
        lines += [f"## Stability: MoE in every block, CLS routing, GShard 0.01 (`{c['stability_data']}`, "
                  f"{c['stability_epochs']} epochs, layer decay {c['stability_layer_decay']})", "",
                  "| variant | test acc | worst seed | train-loss std (2nd half) |", "|---|---|---|---|"]
        lines += [f"| {name('stability', v)} | {f(a['test_acc'])} | {a['worst_seed']:.4f} | "
                  f"{f(a['loss_std_last_half'])} |" for v, a in summ["stability"].items()]
        if res.get("pixel_probe") is not None:
            lines += ["", f"Baselines on the same images: raw-pixel linear probe {res['pixel_probe']:.4f}; "
                      "`scratch` is the dense ViT fine-tuned the same way from random initialisation."]
        lines += _paired_lines(summ.get("stability_paired", {}), "test accuracy")
        fig, ax = plt.subplots(figsize=(5, 3))
        for r in res["stability"]:
            xs, ys = zip(*r["curve"]) if r["curve"] else ((), ())
            ax.plot(xs, ys, marker="o", color={"dense": "C0", "moe_noshared": "C3", "moe_shared": "C2",
                                               "scratch": "C7"}[r["variant"]],
                    alpha=0.7, label=r["variant"] if r["seed"] == c["seeds"][0] else None)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "stability_curves.png", dpi=90)
        plt.close(fig)
        lines += ["", "![test accuracy per epoch, every seed](stability_curves.png)", ""]
    if summ["segmentation"]:
        lines += [f"## Segmentation on `{c['seg_data']}` ({c['seg_epochs']} epochs, linear head, layer decay "
                  f"{c['seg_layer_decay']}; MoE: token routing in `{c['seg_placement']}`, shared expert, GShard 0.001)",
                  "", "| variant | mIoU | pixel accuracy |", "|---|---|---|"]
        lines += [f"| {name('segmentation', v)} | {f(a['miou'])} | {f(a['pixel_acc'])} |"
                  for v, a in summ["segmentation"].items()]
        lines += _paired_lines(summ.get("segmentation_paired", {}), "mIoU")
        lines += ["", "The scenes are real MNIST / Fashion-MNIST pixels with their real classes; the layout (2-3 "
                  "objects pasted on a canvas) is generated.", ""]
        for v in SEG_VARIANTS:
            if (out / f"seg_masks_{v}.png").exists():
                lines += [f"![{v} masks](seg_masks_{v}.png)", ""]
            if (out / f"seg_routing_{v}.png").exists():
                lines += [f"![{v} token-to-expert maps](seg_routing_{v}.png)", ""]
    atomic_write_bytes(out / "report.md", ("\n".join(lines) + "\n").encode())
