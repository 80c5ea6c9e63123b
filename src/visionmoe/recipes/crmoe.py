"""CR-MoE study (Chen et al., TMLR 2024): MoCo v3 pre-training of a dense ViT, a V-MoE and a
V-MoE with OGAR at equal steps on bundled real images, then the paper's protocols (linear
probe, k-NN, few-shot with confidence intervals; semi-supervised: a linear classifier on frozen
features with 1 % of the labels, fine-tuning from the first MLP-head layer with 10 % and the lr
chosen on a validation split) and the routing-consistency metric. Beside them, what anyone can
compute: the same protocols on the randomly initialised encoder and on raw pixels; seed-paired
differences with 95 % intervals decide the paper's claims. A markdown report with plots.

``visionmoe crmoe [--quick] [key=value ...]``; every checkpoint can also be evaluated on its
own with ``visionmoe probe CHECKPOINT --data NAME``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .._utils import (
    atomic_write_bytes,
    finish_study,
    finished_runs,
    fmt_mean_std,
    mean_std,
    save_results,
    study_progress,
)
from ..data import TensorSplits, adapt, load_dataset
from ..eval import evaluate_backbone, head_first_layer, knn_accuracy, label_subset, linear_probe
from ..eval.backbone import SHORT_SEMI_LRS
from ..train import Trainer, build_model, config_from_dict, seed_everything
from .common import curve_summary, logged_curve, study_config

__all__ = ["CRMoEStudyConfig", "run_crmoe_study", "evaluate_backbone", "pixel_baselines", "paired_claims",
           "VARIANTS", "CLAIMS"]

VARIANTS = ("dense", "vmoe", "vmoe_ogar")
#: the random-initialised encoder of each seed, evaluated with the same protocols
RANDOM = "random init"
#: the paper's claims, ``(a, b)`` = "a beats b": CR-MoE over naive MoE + CL and over MoCo v3's
#: dense ViT, and every pre-trained encoder over its random initialisation
CLAIMS = (("vmoe_ogar", "vmoe"), ("vmoe_ogar", "dense"), ("vmoe", "dense"), ("dense", RANDOM), ("vmoe", RANDOM),
          ("vmoe_ogar", RANDOM))


@dataclass
class CRMoEStudyConfig:
    """Defaults: the CR-MoE shape at CPU scale (ViT width 64, depth 6, patch 7 on 28 px; V-MoE
    every other block, 16 experts, top-2, expert hidden 2D, no noise, no capacity limit,
    importance loss 0.01), MoCo v3 with the frozen random patch projection, 3 seeds.
    OGAR: ``ogar_weight`` w_G, ``alpha``, ``ogar_parts`` (``both``/``cls``/``patch``).
    Semi-supervised on the pre-training pool: ``semi_linear_fractions`` (linear classifier on
    frozen features), ``semi_finetune_fractions`` (fine-tune from the first MLP-head layer,
    ``semi_steps`` steps, lr from ``semi_lrs`` on a validation split)."""

    data: str = "fashion_mnist"
    pretrain_limit: int = 10000
    eval_tasks: list[str] = field(default_factory=lambda: ["fashion_mnist", "mnist5k", "textures"])
    img_size: int = 28
    vit: dict = field(default_factory=lambda: dict(patch_size=7, embed_dim=64, depth=6, num_heads=4))
    num_experts: int = 16
    top_k: int = 2
    expert_ratio: float = 2.0
    balance_weight: float = 0.01
    ogar_weight: float = 0.001
    alpha: float = 0.3
    ogar_parts: str = "both"
    moco: dict = field(default_factory=lambda: dict(dim=64, mlp_dim=256, temperature=0.2, momentum=0.99))
    augment: dict = field(default_factory=lambda: dict(scale=[0.2, 1.0]))
    freeze_patch_embed: bool = True
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1.5e-3
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    probe_train_limit: int = 3000
    probe_test_limit: int = 1000
    shots: list[int] = field(default_factory=lambda: [4, 10])
    episodes: int = 5
    semi_linear_fractions: list[float] = field(default_factory=lambda: [0.01])
    semi_finetune_fractions: list[float] = field(default_factory=lambda: [0.1])
    semi_steps: int = 200
    semi_lrs: list[float] = field(default_factory=lambda: list(SHORT_SEMI_LRS))
    consistency_images: int = 512

    def __post_init__(self) -> None:
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad:
            raise ValueError(f"unknown variants {bad}; choose from {list(VARIANTS)}")
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        if self.semi_finetune_fractions and not self.semi_lrs:
            raise ValueError("semi_lrs must list at least one learning rate when semi_finetune_fractions is set")

    @classmethod
    def quick(cls) -> CRMoEStudyConfig:
        """About a minute: a smaller model on 1,000 MNIST images, one seed (a smoke run)."""
        return cls(pretrain_limit=1000, steps=200, batch_size=32, seeds=[0], probe_train_limit=500,
                   probe_test_limit=300, episodes=2, semi_steps=20, semi_lrs=[1e-3], consistency_images=64,
                   eval_tasks=["mnist5k"], data="mnist5k",
                   vit=dict(patch_size=7, embed_dim=32, depth=4, num_heads=2), num_experts=4)

    @classmethod
    def from_overrides(cls, overrides: list[str] | None = None, *, quick: bool = False) -> CRMoEStudyConfig:
        return study_config(cls, overrides, quick=quick)


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
                           "augment": c.augment, "freeze_patch_embed": c.freeze_patch_embed},
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


def pixel_baselines(tasks: dict[str, TensorSplits], semi: TensorSplits, c: CRMoEStudyConfig) -> dict:
    """What anyone can compute without pre-training: linear probe, k-NN and the 1 % linear
    classifier on the raw pixels of the same images."""
    out: dict = {"linear": {}, "knn": {}, "semi": {}}
    for name, t in tasks.items():
        ftr, fte = t.x_train.flatten(1), t.x_test.flatten(1)
        out["linear"][name] = linear_probe(ftr, t.y_train, fte, t.y_test, num_classes=t.num_classes)
        out["knn"][name] = knn_accuracy(ftr, t.y_train, fte, t.y_test, k=20, num_classes=t.num_classes)
    for frac in c.semi_linear_fractions:
        idx = label_subset(semi.y_train, fraction=frac, seed=0)
        out["semi"][f"linear {frac:g}"] = {"acc": linear_probe(
            semi.x_train[idx].flatten(1), semi.y_train[idx], semi.x_test.flatten(1), semi.y_test,
            num_classes=semi.num_classes)}
    return out


def _evaluate(model, head, tasks, semi, cons_x, c: CRMoEStudyConfig, seed: int, run_dir: Path) -> dict:
    return evaluate_backbone(model, tasks, shots=c.shots, episodes=c.episodes, seed=seed, semi=semi,
                             semi_linear_fractions=c.semi_linear_fractions,
                             semi_finetune_fractions=c.semi_finetune_fractions, semi_steps=c.semi_steps,
                             semi_lrs=c.semi_lrs, head=head, consistency_x=cons_x, run_dir=run_dir)


def run_crmoe_study(c: CRMoEStudyConfig | None = None, *, out: str | Path = "runs/crmoe",
                    progress: bool = True, resume: bool = False) -> dict:
    """Every variant and seed of ``c``; ``resume=True`` keeps the runs an earlier call finished
    in ``out`` (same settings; ``seeds`` and ``variants`` may grow) and trains the rest."""
    c = c or CRMoEStudyConfig()
    done = finished_runs(out, asdict(c), resume, may_change=("seeds", "variants"))
    console, bars = study_progress("CR-MoE study", "steps", progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pre = _limit(load_dataset(c.data), c.pretrain_limit, c.probe_test_limit, c.img_size)
    tasks = {n: _limit(load_dataset(n), c.probe_train_limit, c.probe_test_limit, c.img_size) for n in c.eval_tasks}
    semi = pre  # semi-supervised: the pre-training images, a fraction of them labelled
    cons_x = semi.x_test[: c.consistency_images]
    wanted = {(v, s) for s in c.seeds for v in (RANDOM, *c.variants)}
    kept = [r for r in done if (r["variant"], r["seed"]) in wanted]
    results: dict = {"config": asdict(c), "runs": kept, "pixels": pixel_baselines(tasks, semi, c)}
    finished = {(r["variant"], r["seed"]) for r in kept}
    runs = [(v, s) for s in c.seeds for v in (RANDOM, *c.variants) if (v, s) not in finished]
    if kept:
        console.print(f"resuming {out}: {len(kept)} finished runs kept, {len(runs)} to go")
    with bars as bar:
        task = bar.add_task("", total=sum(c.steps for v, _ in runs if v != RANDOM), stage="")
        for variant, seed in runs:
            rd = out / f"{variant.replace(' ', '_')}_seed{seed}"
            row: dict = {"variant": variant, "seed": seed}
            if variant == RANDOM:  # the dense run's encoder as this seed initialises it, never trained
                seed_everything(seed)
                model = build_model(config_from_dict(experiment(c, "dense", seed)), num_classes=0, in_chans=1)
                head = None
            else:
                bar.update(task, stage=f"{variant} seed {seed}: MoCo v3 pre-training")
                tr = Trainer(config_from_dict(experiment(c, variant, seed)), data=pre, run_dir=rd)
                t1 = time.perf_counter()
                summary = tr.fit(on_step=lambda *_: bar.advance(task), overwrite=True)
                row.update(pretrain_seconds=time.perf_counter() - t1, test_ctr_loss=summary["test_ctr_loss"],
                           loss_curve=curve_summary(logged_curve(rd, "ctr_loss")[1]))
                model, head = tr.model, head_first_layer(tr.objective, tr.model.embed_dim)
            bar.update(task, stage=f"{variant} seed {seed}: evaluation")
            row.update(_evaluate(model, head, tasks, semi, cons_x, c, seed, rd))
            results["runs"].append(row)
            bar.console.print(f"{variant} seed {seed}: linear " + ", ".join(
                f"{k} {v:.3f}" for k, v in row["linear"].items()) + "; k-NN " + ", ".join(
                f"{k} {v:.3f}" for k, v in row["knn"].items()))
            save_results(out, results, _aggregate)
    _warn_below_baselines(results, console)
    return finish_study(out, results, t0, _aggregate, _report, console)


def _metrics(run: dict) -> dict[str, float]:
    """The headline numbers of one run, keyed ``protocol/task``: linear probe, k-NN and the
    semi-supervised protocols (few-shot has its own per-split intervals in the run)."""
    m = {f"linear/{t}": v for t, v in run["linear"].items()}
    m |= {f"knn/{t}": v for t, v in run["knn"].items()}
    m |= {f"semi {k}": v["acc"] for k, v in run["semi"].items()}
    return m


def paired_claims(runs: list[dict], claims=CLAIMS) -> dict:
    """Per metric, the seed-paired differences of :data:`CLAIMS` with their 95 % t intervals
    and verdicts (``reproduced`` / ``refuted`` / ``not resolved``)."""
    from ..eval.stats import paired_difference

    by = {(r["variant"], r["seed"]): _metrics(r) for r in runs}
    seeds = sorted({s for _, s in by})
    out: dict = {}
    for a, b in claims:
        pairs = [(by[(a, s)], by[(b, s)]) for s in seeds if (a, s) in by and (b, s) in by]
        if not pairs:
            continue
        out[f"{a} - {b}"] = {k: paired_difference([x[k] for x, _ in pairs], [y[k] for _, y in pairs])
                             for k in pairs[0][0]}
    return out


def _warn_below_baselines(res: dict, console) -> None:
    """A warning line for every pre-trained encoder (mean over seeds) at or below its random
    initialisation or the raw pixels in a linear probe or k-NN."""
    agg = res["summary"]
    for v in res["config"]["variants"]:
        for proto in ("linear", "knn"):
            for t, d in agg.get(v, {}).get(proto, {}).items():
                lost = [f"{name} ({ref:.3f})" for name, ref in (("random init", agg[RANDOM][proto][t]["mean"]),
                                                                 ("raw pixels", res["pixels"][proto][t]))
                        if d["mean"] <= ref]
                if lost:
                    console.print(f"[bold yellow]warning:[/] {v}: {proto} on {t} {d['mean']:.3f} does not beat "
                                  + " nor ".join(lost))


def _aggregate(res: dict) -> None:
    """Mean ± std over seeds of every number, per variant; the paired claims."""
    agg: dict = {}
    for v in (RANDOM, *res["config"]["variants"]):
        rs = [r for r in res["runs"] if r["variant"] == v]
        if not rs:
            continue
        a: dict = {"linear": {}, "knn": {}, "few_shot": {}, "semi": {}, "consistency": {}}
        for t in rs[0]["linear"]:
            a["linear"][t] = mean_std([r["linear"][t] for r in rs])
            a["knn"][t] = mean_std([r["knn"][t] for r in rs])
            a["few_shot"][t] = {s: mean_std([r["few_shot"][t][s]["mean"] for r in rs]) for s in rs[0]["few_shot"][t]}
        for f in rs[0]["semi"]:
            a["semi"][f] = mean_std([r["semi"][f]["acc"] for r in rs])
        for b in rs[0].get("consistency", {}):
            a["consistency"][b] = {k: mean_std([r["consistency"][b][k] for r in rs]) for k in ("matched", "random")}
        agg[v] = a
    res["summary"] = agg
    res["paired"] = paired_claims(res["runs"])


def _report(out: Path, res: dict) -> None:
    """``report.md`` (and ``routing_consistency.png``) in ``out`` from the study's results."""
    from ..eval.stats import format_difference

    c, agg, px = res["config"], res["summary"], res["pixels"]
    f = fmt_mean_std
    methods = [v for v in c["variants"] if v in agg]
    lines = ["# CR-MoE study", "",
             f"MoCo v3 pre-training on {c['pretrain_limit']} `{c['data']}` images for {c['steps']} steps "
             f"(batch {c['batch_size']}, lr {c['lr']:g}, frozen random patch projection: "
             f"{c['freeze_patch_embed']}), ViT {c['vit']}; V-MoE: every other block, {c['num_experts']} experts, "
             f"top-{c['top_k']}, expert hidden {c['expert_ratio']}D; OGAR w_G {c['ogar_weight']}, alpha {c['alpha']}. "
             f"Seeds {c['seeds']} (finished: " + ", ".join(
                 f"{v} {sorted(r['seed'] for r in res['runs'] if r['variant'] == v)}" for v in (RANDOM, *methods))
             + f"); {(res.get('seconds') or 0) / 60:.1f} min. Mean ± std over the finished seeds. "
             f"*random init*: the dense encoder of each seed before pre-training; *raw pixels*: the same "
             "protocol on the images' pixels. A pre-trained cell that does not beat both is marked †.", ""]
    curves = [(r["variant"], r["seed"], r["loss_curve"]) for r in res["runs"] if r.get("loss_curve")]
    if curves:
        lines += ["Contrastive loss, first -> last tenth of the logged steps: " + "; ".join(
            f"{v} seed {s} {d['first']:.3f} -> {d['last']:.3f}" + ("" if d["falls"] else " (**did not fall**)")
            for v, s, d in curves) + ".", ""]
    tasks = list(next(iter(agg.values()))["linear"])

    def cell(v: str, proto: str, t: str) -> str:
        d = agg[v][proto][t]
        flag = v != RANDOM and (d["mean"] <= agg[RANDOM][proto][t]["mean"] or d["mean"] <= px[proto][t])
        return f(d, 3) + (" †" if flag else "")

    for proto in ("linear", "knn"):
        lines += [f"## {'Linear probe' if proto == 'linear' else 'k-NN (k=20)'} accuracy", "",
                  "| variant | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        lines += [f"| {v} | " + " | ".join(cell(v, proto, t) for t in tasks) + " |" for v in (RANDOM, *methods)]
        lines += ["| raw pixels | " + " | ".join(f"{px[proto][t]:.3f}" for t in tasks) + " |", ""]
    lines += ["## Few-shot accuracy (linear probe on k labelled images per class; each seed averages "
              f"{c['episodes']} sampled splits)", "", "| variant | " + " | ".join(
                  f"{t} {s}-shot" for t in tasks for s in c["shots"]) + " |",
              "|---" * (len(tasks) * len(c["shots"]) + 1) + "|"]
    lines += [f"| {v} | " + " | ".join(f(agg[v]["few_shot"][t][str(s)], 3) for t in tasks for s in c["shots"]) + " |"
              for v in (RANDOM, *methods)]
    lines += _semi_table(res, agg, px, methods)
    if res.get("paired"):
        lines += ["", "## The paper's claims, seed-paired (95% t interval)", "",
                  "`a - b` over seeds; *reproduced* only where the interval excludes 0 in the claimed direction "
                  "(a better), *refuted* where it excludes 0 the other way.", "",
                  "| claim | metric | difference |", "|---|---|---|"]
        for claim, d in res["paired"].items():
            lines += [f"| {claim} | {k} | {format_difference(v)} |" for k, v in d.items()]
    lines += _consistency_section(out, {v: agg[v]["consistency"] for v in methods if agg[v]["consistency"]})
    atomic_write_bytes(out / "report.md", ("\n".join(lines) + "\n").encode())


def _semi_table(res: dict, agg: dict, px: dict, methods: list[str]) -> list[str]:
    """The report's semi-supervised table (with the lr each seed chose), or nothing."""
    c, f, lines = res["config"], fmt_mean_std, []
    semi_keys = list(next(iter(agg.values()))["semi"])
    if semi_keys:
        picked = {}
        for r in res["runs"]:
            for k, d in r["semi"].items():
                if "lr" in d:
                    picked.setdefault((r["variant"], k), []).append(f"{d['lr']:g}")
        lines += ["", f"## Semi-supervised on `{c['data']}` ({c['pretrain_limit']} images, a fraction labelled)", "",
                  "`linear F`: a linear classifier on frozen features of F of the labels; `finetune F`: the whole "
                  "network fine-tuned from the first MLP-head layer (random init: from a linear head) for "
                  f"{c['semi_steps']} steps, lr chosen from {c['semi_lrs']} on a validation split of other "
                  "training images.", "",
                  "| variant | " + " | ".join(semi_keys) + " | lr chosen per seed |",
                  "|---" * (len(semi_keys) + 2) + "|"]
        lines += [f"| {v} | " + " | ".join(f(agg[v]["semi"][k], 3) for k in semi_keys) + " | "
                  + "; ".join(f"{k}: {', '.join(x)}" for (vv, k), x in picked.items() if vv == v) + " |"
                  for v in (RANDOM, *methods)]
        lines.append("| raw pixels | " + " | ".join(f"{px['semi'][k]['acc']:.3f}" if k in px["semi"] else "—"
                                                    for k in semi_keys) + " | |")
    return lines


def _consistency_section(out: Path, moe: dict) -> list[str]:
    """The routing-consistency table and bar chart (``routing_consistency.png``) of the MoE variants."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f, lines = fmt_mean_std, []
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
    return lines
