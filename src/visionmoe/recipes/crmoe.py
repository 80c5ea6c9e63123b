"""CR-MoE study (Chen et al., TMLR 2024): MoCo v3 pre-training of a dense ViT, a V-MoE and a
V-MoE with OGAR at equal steps on bundled real images, then the evaluation protocols
(linear probe, k-NN, few-shot with confidence intervals, semi-supervised fine-tuning on 1% /
10% of the labels) and the routing-consistency metric; a markdown report with plots.

``visionmoe crmoe [--quick] [key=value ...]``; every checkpoint can also be evaluated on its
own with ``visionmoe probe CHECKPOINT --data NAME``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .._utils import atomic_write_bytes, finish_study, fmt_mean_std, mean_std, save_results, study_progress
from ..data import TensorSplits, adapt, load_dataset
from ..eval import extract_features, few_shot, knn_accuracy, label_subset, linear_probe, routing_consistency
from ..train import Trainer, config_from_dict

__all__ = ["CRMoEStudyConfig", "run_crmoe_study", "evaluate_backbone", "VARIANTS"]

VARIANTS = ("dense", "vmoe", "vmoe_ogar")


@dataclass
class CRMoEStudyConfig:
    """Defaults: about 20 minutes on 2 CPU cores (measured 21). The V-MoE has the CR-MoE shape (every other
    block, 16 experts, top-2, expert hidden 2D, no noise, no capacity limit, importance loss
    0.01); OGAR: ``ogar_weight`` w_G, ``alpha``, ``ogar_parts`` (``both``/``cls``/``patch``)."""

    data: str = "fashion_mnist"
    pretrain_limit: int = 10000
    eval_tasks: list[str] = field(default_factory=lambda: ["fashion_mnist", "mnist5k", "textures"])
    img_size: int = 28
    vit: dict = field(default_factory=lambda: dict(patch_size=4, embed_dim=64, depth=6, num_heads=4))
    num_experts: int = 16
    top_k: int = 2
    expert_ratio: float = 2.0
    balance_weight: float = 0.01
    ogar_weight: float = 0.001
    alpha: float = 0.3
    ogar_parts: str = "both"
    moco: dict = field(default_factory=lambda: dict(dim=64, mlp_dim=256, temperature=0.2, momentum=0.99))
    augment: dict = field(default_factory=lambda: dict(scale=[0.2, 1.0]))
    steps: int = 150
    batch_size: int = 64
    lr: float = 1.5e-3
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    probe_train_limit: int = 3000
    probe_test_limit: int = 1000
    shots: list[int] = field(default_factory=lambda: [4, 10])
    episodes: int = 5
    semi_fractions: list[float] = field(default_factory=lambda: [0.01, 0.1])
    semi_steps: int = 40
    consistency_images: int = 512

    def __post_init__(self) -> None:
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad:
            raise ValueError(f"unknown variants {bad}; choose from {list(VARIANTS)}")
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")

    @classmethod
    def quick(cls) -> CRMoEStudyConfig:
        return cls(pretrain_limit=1000, steps=20, batch_size=32, seeds=[0], probe_train_limit=500,
                   probe_test_limit=300, episodes=2, semi_steps=10, consistency_images=64, eval_tasks=["mnist5k"],
                   data="mnist5k", vit=dict(patch_size=4, embed_dim=32, depth=4, num_heads=2), num_experts=4)

    @classmethod
    def from_overrides(cls, overrides: list[str] | None = None, *, quick: bool = False) -> CRMoEStudyConfig:
        from ..train.config import _from_dict, apply_overrides

        d = apply_overrides({}, list(overrides or []))
        return _from_dict(cls, {**asdict(cls.quick() if quick else cls()), **d})


def experiment(c: CRMoEStudyConfig, variant: str, seed: int) -> dict:
    """The :class:`~visionmoe.train.ExperimentConfig` dict of one pre-training run."""
    dim = c.vit["embed_dim"]
    moe = {}
    if variant != "dense":
        moe = {"num_experts": c.num_experts, "top_k": c.top_k, "placement": "every_2", "noise_std": 0.0,
               "expert_hidden": int(c.expert_ratio * dim), "capacity_factor": None, "eval_capacity_factor": None,
               "aux_weights": {"importance": c.balance_weight}}
    ogar = c.ogar_weight if variant == "vmoe_ogar" else 0.0
    return {
        "model": {"name": "vit_mini_patch4_28" if variant == "dense" else "vmoe_mini_patch4_28",
                  "args": {"img_size": c.img_size, "in_chans": 1, "num_classes": 0, **c.vit}},
        "moe": moe,
        "data": {"name": c.data, "augment": "none", "batch_size": c.batch_size, "eval_batch_size": 256},
        "objective": "moco",
        "objective_args": {**c.moco, "ogar_weight": ogar, "alpha": c.alpha, "ogar_parts": c.ogar_parts,
                           "augment": c.augment},
        "optim": {"name": "adamw", "lr": c.lr, "weight_decay": 0.1},
        "schedule": {"max_steps": c.steps, "warmup_epochs": 0.05, "min_lr": 0.0},
        "run": {"seed": seed, "progress": False, "print_eval": False, "log_every": 10, "eval_every_epochs": 1e9,
                "checkpoint_every": 10**9, "keep_checkpoints": 1,
                "device": "cpu"},  # the study's probes and routing analysis work on CPU tensors
    }


def _limit(s: TensorSplits, n_train: int | None, n_test: int | None, size: int) -> TensorSplits:
    g = torch.Generator().manual_seed(0)
    tr = torch.randperm(len(s.x_train), generator=g)[:n_train] if n_train else torch.arange(len(s.x_train))
    te = torch.randperm(len(s.x_test), generator=g)[:n_test] if n_test else torch.arange(len(s.x_test))
    return TensorSplits(s.name, adapt(s.x_train[tr], channels=1, size=size), s.y_train[tr],
                        adapt(s.x_test[te], channels=1, size=size), s.y_test[te], s.classes)


def evaluate_backbone(model, tasks: dict[str, TensorSplits], *, shots=(4, 10), episodes: int = 5, seed: int = 0,
                      semi: TensorSplits | None = None, semi_fractions=(), semi_steps: int = 60,
                      consistency_x: torch.Tensor | None = None, run_dir: Path | None = None) -> dict:
    """Linear probe, k-NN and few-shot accuracy per task on frozen CLS features; optional
    semi-supervised fine-tuning on label fractions of ``semi``; routing consistency."""
    out: dict = {"linear": {}, "knn": {}, "few_shot": {}, "semi": {}}
    for name, t in tasks.items():
        ftr = extract_features(model, t.x_train, pool="cls")
        fte = extract_features(model, t.x_test, pool="cls")
        out["linear"][name] = linear_probe(ftr, t.y_train, fte, t.y_test, num_classes=t.num_classes)
        out["knn"][name] = knn_accuracy(ftr, t.y_train, fte, t.y_test, k=20, num_classes=t.num_classes)
        out["few_shot"][name] = {str(s): few_shot(ftr, t.y_train, fte, t.y_test, shots=s, episodes=episodes,
                                                  seed=seed, num_classes=t.num_classes) for s in shots}
    for frac in semi_fractions:
        idx = label_subset(semi.y_train, fraction=frac, seed=seed)
        sub = TensorSplits(semi.name, semi.x_train[idx], semi.y_train[idx], semi.x_test, semi.y_test, semi.classes)
        m = copy.deepcopy(model)
        m.reset_classifier(semi.num_classes)
        cfg = {"data": {"name": semi.name, "augment": "none", "batch_size": min(64, len(idx))},
               "optim": {"name": "adamw", "lr": 5e-4, "weight_decay": 0.05},
               "schedule": {"max_steps": semi_steps, "warmup_epochs": 0.0, "min_lr": 0.0},
               "run": {"seed": seed, "progress": False, "print_eval": False, "log_every": 10**9,
                       "eval_every_epochs": 1e9, "checkpoint_every": 10**9, "keep_checkpoints": 1,
                       "device": str(next(m.parameters()).device)}}  # where the backbone is
        rd = (run_dir or Path("runs/probe")) / f"semi_{frac:g}"
        trainer = Trainer(config_from_dict(cfg), data=sub, model=m, run_dir=rd)
        out["semi"][f"{frac:g}"] = trainer.fit(overwrite=True)["test_acc"]
    if consistency_x is not None and hasattr(model, "moe_layers") and model.moe_layers():
        out["consistency"] = {str(b): v for b, v in routing_consistency(model, consistency_x, seed=seed).items()}
    return out


def run_crmoe_study(c: CRMoEStudyConfig | None = None, *, out: str | Path = "runs/crmoe",
                    progress: bool = True) -> dict:
    c = c or CRMoEStudyConfig()
    console, bars = study_progress("CR-MoE study", "steps", progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pre = _limit(load_dataset(c.data), c.pretrain_limit, c.probe_test_limit, c.img_size)
    tasks = {n: _limit(load_dataset(n), c.probe_train_limit, c.probe_test_limit, c.img_size) for n in c.eval_tasks}
    semi = tasks.get(c.data) or _limit(load_dataset(c.data), None, c.probe_test_limit, c.img_size)
    cons_x = semi.x_test[: c.consistency_images]
    results: dict = {"config": asdict(c), "runs": []}
    runs = [(v, s) for s in c.seeds for v in c.variants]
    with bars as bar:
        task = bar.add_task("", total=len(runs) * c.steps, stage="")
        for variant, seed in runs:
            bar.update(task, stage=f"{variant} seed {seed}: MoCo v3 pre-training")
            rd = out / f"{variant}_seed{seed}"
            tr = Trainer(config_from_dict(experiment(c, variant, seed)), data=pre, run_dir=rd)
            t1 = time.perf_counter()
            summary = tr.fit(on_step=lambda *_: bar.advance(task), overwrite=True)
            secs = time.perf_counter() - t1
            bar.update(task, stage=f"{variant} seed {seed}: evaluation")
            ev = evaluate_backbone(tr.model, tasks, shots=c.shots, episodes=c.episodes, seed=seed, semi=semi,
                                   semi_fractions=c.semi_fractions, semi_steps=c.semi_steps, consistency_x=cons_x,
                                   run_dir=rd)
            results["runs"].append({"variant": variant, "seed": seed, "pretrain_seconds": secs,
                                    "test_ctr_loss": summary["test_ctr_loss"], **ev})
            bar.console.print(f"{variant} seed {seed}: linear " + ", ".join(
                f"{k} {v:.3f}" for k, v in ev["linear"].items()))
            save_results(out, results, _aggregate)
    return finish_study(out, results, t0, _aggregate, _report, console)


def _aggregate(res: dict) -> None:
    """Mean ± std over seeds of every number, per variant."""
    agg: dict = {}
    for v in res["config"]["variants"]:
        rs = [r for r in res["runs"] if r["variant"] == v]
        if not rs:
            continue
        a: dict = {"linear": {}, "knn": {}, "few_shot": {}, "semi": {}, "consistency": {}}
        for t in rs[0]["linear"]:
            a["linear"][t] = mean_std([r["linear"][t] for r in rs])
            a["knn"][t] = mean_std([r["knn"][t] for r in rs])
            a["few_shot"][t] = {s: mean_std([r["few_shot"][t][s]["mean"] for r in rs]) for s in rs[0]["few_shot"][t]}
        for f in rs[0]["semi"]:
            a["semi"][f] = mean_std([r["semi"][f] for r in rs])
        for b in rs[0].get("consistency", {}):
            a["consistency"][b] = {k: mean_std([r["consistency"][b][k] for r in rs]) for k in ("matched", "random")}
        agg[v] = a
    res["summary"] = agg


def _report(out: Path, res: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, agg = res["config"], res["summary"]
    f = fmt_mean_std
    lines = ["# CR-MoE study", "",
             f"MoCo v3 pre-training on {c['pretrain_limit']} `{c['data']}` images for {c['steps']} steps "
             f"(batch {c['batch_size']}), ViT {c['vit']}; V-MoE: every other block, {c['num_experts']} experts, "
             f"top-{c['top_k']}, expert hidden {c['expert_ratio']}D; OGAR w_G {c['ogar_weight']}, alpha {c['alpha']}. "
             f"Seeds {c['seeds']}; {res.get('seconds', 0) / 60:.1f} min. Mean ± std over seeds.", ""]
    tasks = list(next(iter(agg.values()))["linear"])
    for proto in ("linear", "knn"):
        lines += [f"## {'Linear probe' if proto == 'linear' else 'k-NN (k=20)'} accuracy", "",
                  "| variant | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        lines += [f"| {v} | " + " | ".join(f(a[proto][t]) for t in tasks) + " |" for v, a in agg.items()]
        lines.append("")
    lines += ["## Few-shot accuracy (linear probe on k labelled images per class; each seed averages "
              f"{c['episodes']} sampled splits)", "", "| variant | " + " | ".join(
                  f"{t} {s}-shot" for t in tasks for s in c["shots"]) + " |",
              "|---" * (len(tasks) * len(c["shots"]) + 1) + "|"]
    lines += [f"| {v} | " + " | ".join(f(a["few_shot"][t][str(s)]) for t in tasks for s in c["shots"]) + " |"
              for v, a in agg.items()]
    if c["semi_fractions"]:
        lines += ["", f"## Semi-supervised fine-tuning on `{c['data']}` ({c['semi_steps']} steps)", "",
                  "| variant | " + " | ".join(f"{x:g} of labels" for x in c["semi_fractions"]) + " |",
                  "|---" * (len(c["semi_fractions"]) + 1) + "|"]
        lines += [f"| {v} | " + " | ".join(f(a["semi"][f"{x:g}"]) for x in c["semi_fractions"]) + " |"
                  for v, a in agg.items()]
    moe = {v: a["consistency"] for v, a in agg.items() if a["consistency"]}
    if moe:
        lines += ["", "## Routing consistency", "",
                  "Mean number of experts shared by the top-k sets of corresponding patches of two views "
                  "(matched) and of random non-corresponding pairs (random).", "",
                  "| variant | block | matched | random |", "|---|---|---|---|"]
        for v, d in moe.items():
            lines += [f"| {v} | {b} | {f(x['matched'])} | {f(x['random'])} |" for b, x in d.items()]
        fig, ax = plt.subplots(figsize=(6, 3))
        width = 0.8 / (2 * len(moe))
        for i, (v, d) in enumerate(moe.items()):
            blocks = list(d)
            xs = torch.arange(len(blocks)).float()
            ax.bar(xs + (2 * i) * width, [d[b]["matched"]["mean"] for b in blocks], width, label=f"{v} matched")
            ax.bar(xs + (2 * i + 1) * width, [d[b]["random"]["mean"] for b in blocks], width, label=f"{v} random",
                   alpha=0.5)
            ax.set_xticks(xs + width * (len(moe) - 0.5), [f"block {b}" for b in blocks])
        ax.set_ylabel("shared experts (of top-k)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "routing_consistency.png", dpi=100)
        plt.close(fig)
        lines += ["", "![routing consistency](routing_consistency.png)"]
    atomic_write_bytes(out / "report.md", ("\n".join(lines) + "\n").encode())
