"""The MoCE pipeline end to end on bundled real images, with MAE* and TokenMoE baselines.

1. Pre-training pool: a mixture of real sources (Fashion-MNIST, MNIST, textures, faces),
   all 28x28 grey; the downstream tasks are sources (Fashion-MNIST, MNIST, textures) plus
   scikit-learn's digits, which pre-training never saw (faces, 50 test images, is too small
   to rank methods and stays in the pool only).
2. Dense MAE pre-training of a CPU-sized ViT on the pool.
3. Unit-norm MAE features -> balanced Sinkhorn-Knopp clustering.
4. Blocks for experts: the MLPs with the largest MAE-loss gradients.
5. Equal extra compute for three continuations: MAE* (the dense MAE trained on), TokenMoE
   (token-routed noisy top-1 experts, importance + load losses) and MoCE (cluster-conditional
   experts, imbalance + distillation losses).
6. Transfer to every task: MAE* and TokenMoE fine-tune the whole model; MoCE assigns the
   task's images to clusters, keeps the largest cluster's experts as a dense ViT and
   fine-tunes that. One protocol for every method (AdamW, warm-up, cosine, label smoothing,
   layer-wise lr decay for pre-trained encoders), beside two baselines anyone can compute on
   the same images: a linear probe on the raw pixels and the same fine-tune from random
   initialisation.
7. A markdown report with plots, the per-task accuracy table over seeds, and seed-paired
   differences with 95% confidence intervals; an encoder that does not beat the random
   initialisation is flagged.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..analysis import class_expert_table, dominant_expert_share, gradient_magnitude_scores
from ..clustering import ClusterConfig, fit_clusters
from ..data import TensorSplits, load_dataset, make_mixture
from ..eval import extract_features, linear_probe
from ..models import VisionTransformer, count_parameters
from ..moe.placement import by_scores
from ..moe.upcycle import upcycle_state_dict
from ..objectives import MAEObjective, patchify, unpatchify
from ..train import Trainer, config_from_dict
from .common import curve_summary, logged_curve
from .moce import (
    MoCEObjective,
    build_moce,
    build_sdr,
    deploy,
    distinct_candidates,
    expert_choices,
    score_candidates,
    select_cluster,
)

__all__ = ["MoCEDemoConfig", "run_moce_demo"]


@dataclass
class MoCEDemoConfig:
    """Sizes and budgets of the demo (defaults: about 21 minutes on 2 CPU cores).

    ``shared_mae``: one dense MAE pre-training (with the first seed) for every seed; the seeds
    then vary the clustering, the extra steps, the fine-tuning and the random-init baseline
    (as in the paper, where every method continues from one MAE checkpoint). ``False``: one
    MAE per seed (3.3 more minutes a seed).

    Ablations are plain fields: ``num_experts``, ``num_clusters``, ``blocks`` (explicit MoE
    blocks; default: the ``moe_blocks`` MLPs with the largest MAE-loss gradient),
    ``imbalance_weight`` / ``distill_weight`` (0 switches a loss off). ``renormalize``: the
    top-1 combine weight is 1 (TokenMoE and MoCE start exactly as the MAE encoder; with
    ``False`` the expert output is scaled by its gate probability, eq. 1 as written).
    ``cluster_center``: subtract the mean unit feature before clustering and assignment (with
    the paper's plain cosine, nearest-centroid assignment sent 98-100% of a downstream set to
    one "hub" cluster in our runs, so every task deployed the same experts).
    ``extra_lr_scale``: lr of the equal-step continuations relative to ``mae_lr`` (paper 0.1 for
    a long continuation; at 150 steps 0.1 leaves the three models within 0.0003 of each other
    in reconstruction loss, so the demo uses 1). ``tasks`` are the downstream classification
    sets (``None``: every pre-training source plus ``digits``). ``finetune_lrs`` with more than one value runs a
    learning-rate search on a validation split (first seed) for every task and method.
    Fine-tuning (every method and the random-initialisation baseline alike): ``finetune_optim``
    (a timm optimizer) with ``finetune_weight_decay``, linear warm-up over ``finetune_warmup`` of
    the steps, cosine decay, ``label_smoothing``, augmentation ``finetune_augment`` (``none``,
    ``shift``, ``basic``...) and, for pre-trained encoders only, layer-wise lr decay
    ``finetune_layer_decay`` (timm's). ``baselines``: also report a linear probe on raw pixels
    and the same fine-tune from random initialisation.
    ``compare_selection`` adds the paper's other expert-selection methods (first seed).
    ``sdr`` adds the SDR(ViT) baseline (MoCE Table 3; :func:`~visionmoe.recipes.moce.build_sdr`):
    the same clusters as data subsets, each sent to a random fixed expert, the same extra
    steps, and per task a brute-force search over its distinct subnets (``selection_probe_steps``
    fine-tuning steps each on a validation split).
    """

    sources: list[str] = field(default_factory=lambda: ["fashion_mnist", "mnist5k", "textures", "faces"])
    tasks: list[str] | None = field(default_factory=lambda: ["fashion_mnist", "mnist5k", "textures", "digits"])
    per_source: int = 2000
    img_size: int = 28
    vit: dict = field(default_factory=lambda: dict(patch_size=7, embed_dim=64, depth=6, num_heads=4))
    mae_steps: int = 5000
    mae_lr: float = 1e-3
    shared_mae: bool = True
    mae_warmup: float = 0.5
    extra_steps: int = 150
    extra_lr_scale: float = 1.0
    finetune_steps: int = 500
    finetune_batch_size: int = 64
    finetune_lrs: list[float] = field(default_factory=lambda: [3e-3])
    finetune_optim: str = "adamw"
    finetune_weight_decay: float = 0.05
    finetune_layer_decay: float | None = None
    finetune_warmup: float = 0.1
    label_smoothing: float = 0.1
    finetune_augment: str = "none"
    baselines: bool = True
    finetune_train_limit: int = 1000
    finetune_test_limit: int | None = 1000
    num_clusters: int = 16
    cluster_center: bool = True
    num_experts: int = 4
    moe_blocks: int = 2
    blocks: list[int] | None = None
    imbalance_weight: float = 0.01
    distill_weight: float = 0.01
    renormalize: bool = True
    batch_size: int = 128
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    compare_selection: bool = False
    selection_probe_steps: int = 30
    sdr: bool = False
    equal_size_pools: bool = False
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.num_experts < 1 or self.num_clusters < 1:
            raise ValueError("num_experts and num_clusters must be >= 1")
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        if not self.finetune_lrs:
            raise ValueError("finetune_lrs must list at least one learning rate")

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks) if self.tasks is not None else [*self.sources, "digits"]

    @classmethod
    def quick(cls) -> MoCEDemoConfig:
        """About three minutes: the demo's model, a shorter MAE, two tasks (MNIST and digits), one seed."""
        return cls(per_source=1000, mae_steps=1500, extra_steps=30, finetune_steps=300, num_clusters=8,
                   tasks=["mnist5k", "digits"], seeds=[0])

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, overrides: list[str] | None = None,
                  *, quick: bool = False) -> MoCEDemoConfig:
        """Defaults (or :meth:`quick`), then a YAML file's keys, then ``key=value`` overrides;
        unknown keys and wrong types are refused with a suggestion."""
        from .common import study_config

        return study_config(cls, overrides, quick=quick, path=path)


def _cfg(objective: str, steps: int, bs: int, lr: float, optim: str = "adamw", seed: int = 0, wd: float = 0.05,
         *, augment: str = "none", warmup_epochs: float = 0.05, layer_decay: float | None = None,
         label_smoothing: float = 0.0, **objective_args) -> dict:
    return {"objective": objective, "objective_args": objective_args,
            "data": {"name": "pool", "augment": augment, "batch_size": bs},
            "optim": {"name": optim, "lr": lr, "weight_decay": wd, "momentum": 0.9, "layer_decay": layer_decay},
            "schedule": {"max_steps": steps, "warmup_epochs": warmup_epochs, "min_lr": 0.0},
            "run": {"seed": seed, "progress": False, "print_eval": False, "log_every": 10, "eval_every_epochs": 1e9,
                    "checkpoint_every": 10**9, "keep_checkpoints": 1, "label_smoothing": label_smoothing,
                    # the demo's feature extraction, clustering, probes and plots work on CPU tensors
                    "device": "cpu"}}


def _mae_kwargs(c: MoCEDemoConfig) -> dict:
    return dict(mask_ratio=0.75, decoder_dim=max(32, c.vit["embed_dim"]), decoder_depth=1,
                decoder_heads=c.vit["num_heads"])


def progress_bar(*, console=None, disable: bool = False):
    """The recipes' rich progress bar: steps done of the total, elapsed, ETA, the current stage."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[stage]}")]
    return Progress(*cols, console=console, disable=disable)


class _Stages:
    """One progress bar over every training step of the demo, with an ETA."""

    def __init__(self, bar, total: int) -> None:
        self.bar = bar
        self.task = bar.add_task("MoCE demo", total=total, stage="")

    def add(self, steps: int) -> None:
        """Grow the total when a stage's size is known only at run time."""
        self.bar.update(self.task, total=self.bar.tasks[self.task].total + steps)

    def train(self, model, data: TensorSplits, cfg: dict, run_dir: Path, stage: str, objective=None):
        self.bar.update(self.task, stage=stage)
        t = Trainer(config_from_dict(cfg), data=data, model=model, objective=objective, run_dir=run_dir)
        summary = t.fit(on_step=lambda *_: self.bar.advance(self.task), overwrite=True)  # the recipe owns its folders
        return t, summary


def _subset(task: TensorSplits, n: int | None, n_test: int | None, seed: int) -> TensorSplits:
    g = torch.Generator().manual_seed(seed)
    xtr, ytr, xte, yte = task.x_train, task.y_train, task.x_test, task.y_test
    if n is not None and len(xtr) > n:
        idx = torch.randperm(len(xtr), generator=g)[:n]
        xtr, ytr = xtr[idx], ytr[idx]
    if n_test is not None and len(xte) > n_test:
        idx = torch.randperm(len(xte), generator=torch.Generator().manual_seed(10_000))[:n_test]  # same for seeds
        xte, yte = xte[idx], yte[idx]
    return TensorSplits(task.name, xtr, ytr, xte, yte, task.classes)


def _val_split(task: TensorSplits, seed: int, fraction: float = 0.2) -> TensorSplits:
    """Hold out ``fraction`` of the training images as the 'test' split (for searches)."""
    perm = torch.randperm(len(task.x_train), generator=torch.Generator().manual_seed(seed + 777))
    n_val = max(1, round(len(perm) * fraction))
    val, tr = perm[:n_val], perm[n_val:]
    return TensorSplits(task.name, task.x_train[tr], task.y_train[tr], task.x_train[val], task.y_train[val],
                        task.classes)


def _finetune(stages: _Stages, backbone: VisionTransformer, task: TensorSplits, c: MoCEDemoConfig, seed: int,
              run_dir: Path, lr: float, steps: int | None = None, pretrained: bool = True) -> float:
    """Fine-tune a copy of ``backbone`` with a new head on ``task`` with the demo's one protocol
    (see :class:`MoCEDemoConfig`; layer-wise lr decay only for a pre-trained backbone); returns
    its test accuracy."""
    model = copy.deepcopy(backbone)
    model.reset_classifier(task.num_classes, global_pool="avg")
    model.head.reset_parameters()
    steps = steps or c.finetune_steps
    warmup = c.finetune_warmup * steps * c.finetune_batch_size / max(1, len(task.x_train))  # in epochs
    cfg = _cfg("classification", steps, c.finetune_batch_size, lr, optim=c.finetune_optim, seed=seed,
               wd=c.finetune_weight_decay, augment=c.finetune_augment, warmup_epochs=warmup,
               layer_decay=c.finetune_layer_decay if pretrained else None, label_smoothing=c.label_smoothing)
    return stages.train(model, task, cfg, run_dir, f"fine-tune {run_dir.name}")[1]["test_acc"]


def pixel_probe(task: TensorSplits) -> float:
    """The baseline anyone can compute: a linear probe on the raw pixels of the same images."""
    return linear_probe(task.x_train.flatten(1), task.y_train, task.x_test.flatten(1), task.y_test,
                        num_classes=task.num_classes)


def _cluster(enc: VisionTransformer, feats: Tensor, pool: TensorSplits, k: int, c: MoCEDemoConfig, seed: int):
    """Balanced clustering of the pool's unit-norm features (``feats``) into ``k`` clusters;
    returns the clustering, the training images' balanced assignments (Q of eq. 2) and the
    test images' nearest centroids."""
    clustering = fit_clusters(feats, ClusterConfig(num_clusters=k, batch_size=512, seed=seed, center=c.cluster_center),
                              feature_source=f"seed{seed}/mae")
    return clustering, clustering.assign_balanced(feats), clustering.assign(extract_features(enc, pool.x_test))


def _grad_scores(enc: VisionTransformer, mae: Trainer, pool: TensorSplits, c: MoCEDemoConfig) -> list[float]:
    """MAE-loss gradient magnitude of each block's MLP (MoCE's placement), on 4 batches."""
    probe = MAEObjective(enc, **_mae_kwargs(c))
    probe.decoder.load_state_dict(mae.objective.decoder.state_dict())
    batches = [(pool.x_train[i : i + c.batch_size],) for i in range(0, 4 * c.batch_size, c.batch_size)]
    return gradient_magnitude_scores(enc, batches, lambda m, b: probe(m, b)["loss"])


def _continue(stages: _Stages, c: MoCEDemoConfig, seed: int, mae: Trainer, model: VisionTransformer,
              data: TensorSplits, run_dir: Path, label: str, objective_cls=MAEObjective, **kw):
    """``extra_steps`` more MAE steps for ``model`` from the dense run (its decoder included), at
    ``mae_lr x extra_lr_scale``: the equal extra compute of MAE*, TokenMoE, MoCE and SDR."""
    mk = _mae_kwargs(c)
    obj = objective_cls(model, **kw, **mk)
    obj.decoder.load_state_dict(mae.objective.decoder.state_dict())
    extra = _cfg("mae", c.extra_steps, c.batch_size, c.mae_lr * c.extra_lr_scale, seed=seed, **mk)
    return stages.train(model, data, extra, run_dir, label, objective=obj)


METHODS = ("MAE*", "TokenMoE", "MoCE")


def _methods(c: MoCEDemoConfig) -> tuple[str, ...]:
    return (*METHODS, "SDR") if c.sdr else METHODS


def _total_steps(c: MoCEDemoConfig) -> int:
    methods = _methods(c)
    ft = (len(methods) + int(c.baselines)) * len(c.task_names) * c.finetune_steps
    per_seed = len(methods) * c.extra_steps + ft
    search = ft * len(c.finetune_lrs) if len(c.finetune_lrs) > 1 else 0
    mae = c.mae_steps * (1 if c.shared_mae else len(c.seeds))
    return per_seed * len(c.seeds) + search + mae


def run_moce_demo(c: MoCEDemoConfig | None = None, *, out: str | Path = "runs/moce_demo",
                  progress: bool = True) -> dict:
    """Run the whole pipeline; returns the results and writes ``report.md`` with plots to ``out``."""
    from rich.console import Console

    c = c or MoCEDemoConfig()
    if c.threads:
        torch.set_num_threads(c.threads)
    console = Console(quiet=not progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    sources = [load_dataset(n) for n in c.sources]
    by_name = {s.name: s for s in sources}
    tasks = {}
    for name in c.task_names:
        s = by_name.get(name) or load_dataset(name)
        s = TensorSplits(s.name, *_adapt_all(s, c.img_size), s.classes)
        tasks[name] = _subset(s, c.finetune_train_limit, c.finetune_test_limit, 0)
    mix = make_mixture(sources, size=c.img_size, channels=1, per_source=c.per_source, seed=0)
    pool = mix.as_splits("source")
    console.print(f"[bold]MoCE demo[/]: pre-training pool of {len(pool.x_train)} images from {mix.sources}; "
                  f"downstream tasks {list(tasks)}; seeds {c.seeds}")
    results: dict = {"config": asdict(c), "tasks": {}, "runs": [], "lr": {}}
    with progress_bar(console=console, disable=not progress) as bar:
        stages = _Stages(bar, _total_steps(c))
        shared: dict = {}  # the dense MAE when shared_mae
        for i, seed in enumerate(c.seeds):
            run = _run_seed(stages, c, seed, mix, tasks, out, results, first=i == 0, console=bar.console, shared=shared)
            results["runs"].append(run)
            results["seconds"] = time.perf_counter() - t_start
            _write_results(out, results)  # after every seed: a stopped run keeps what it finished
    console.print(_summary_table(results))
    console.print(f"report: {out / 'report.md'} ({results['seconds']:.0f} s)")
    return results


def _write_results(out: Path, results: dict) -> None:
    """Aggregate the finished seeds (mean ± std per task and method) and write
    ``results.json`` and ``report.md`` atomically."""
    from .._utils import atomic_write_bytes, mean_std

    for key, field_ in (("tasks", "acc"), ("probe", "probe"), ("baselines", "baselines")):
        if field_ not in results["runs"][0]:
            continue
        results[key] = {}
        for name in results["runs"][0][field_]:
            results[key][name] = {}
            for method in results["runs"][0][field_][name]:
                results[key][name][method] = mean_std([r[field_][name][method] for r in results["runs"]])
    results["paired"] = paired_comparisons(results["runs"])
    atomic_write_bytes(out / "results.json", json.dumps(results, indent=2).encode())
    _write_report(out, results)


#: the paper's claims (MoCE Table 2) and the baseline every pre-trained encoder should beat:
#: (a, b) means "a is better than b"
CLAIMS = (("MoCE", "MAE*"), ("MoCE", "TokenMoE"), ("MAE*", "random init"), ("TokenMoE", "random init"),
          ("MoCE", "random init"))


def paired_comparisons(runs: list[dict]) -> dict:
    """Per task, the seed-paired fine-tuned accuracy differences of :data:`CLAIMS` with their 95%
    intervals and verdicts (``reproduced`` / ``refuted`` / ``not resolved``)."""
    from ..eval.stats import paired_difference

    def col(run: dict, task: str, m: str):
        return run["acc"][task].get(m, run.get("baselines", {}).get(task, {}).get(m))

    out: dict = {}
    for task in runs[0]["acc"]:
        out[task] = {}
        for a, b in CLAIMS:
            va, vb = [col(r, task, a) for r in runs], [col(r, task, b) for r in runs]
            if any(v is None for v in va + vb):
                continue
            out[task][f"{a} - {b}"] = paired_difference(va, vb)
    return out


def pretrain_dense(stages: _Stages, c: MoCEDemoConfig, seed: int, pool: TensorSplits, run_dir: Path, label: str,
                   console) -> tuple[VisionTransformer, Trainer, dict]:
    """Dense MAE pre-training of the demo's ViT on ``pool``: ``(encoder, its trainer, loss
    curve summary)``; warns when the loss did not fall."""
    torch.manual_seed(seed)
    mk = _mae_kwargs(c)
    enc = VisionTransformer(img_size=c.img_size, in_chans=1, num_classes=0, **c.vit)
    mae, _ = stages.train(enc, pool, _cfg("mae", c.mae_steps, c.batch_size, c.mae_lr, seed=seed,
                                          warmup_epochs=c.mae_warmup, **mk), run_dir, label)
    curve = curve_summary(logged_curve(run_dir)[1])  # means of the first and the last tenth of the logged steps
    if not curve["falls"]:
        console.print(f"[bold yellow]warning:[/] {label}: the MAE loss did not fall ({curve['first']:.3f} -> "
                      f"{curve['last']:.3f}); its features are not evidence of pre-training")
    return enc, mae, curve


def _run_seed(stages: _Stages, c: MoCEDemoConfig, seed: int, mix, tasks: dict, out: Path,
              results: dict, *, first: bool, console, shared: dict) -> dict:
    pool = mix.as_splits("source")
    torch.manual_seed(seed)
    sd = out / f"seed{seed}"
    vit_args = dict(img_size=c.img_size, in_chans=1, num_classes=0, **c.vit)
    timings: dict[str, float] = {}
    # 2. dense MAE pre-training (once for every seed with shared_mae)
    if c.shared_mae and "dense" in shared:
        enc, mae, mae_curve = shared["dense"]
        enc = copy.deepcopy(enc)
    else:
        t0 = time.perf_counter()
        run_dir = out / "mae" if c.shared_mae else sd / "mae"
        enc, mae, mae_curve = pretrain_dense(stages, c, seed, pool, run_dir, f"seed {seed}: MAE pre-training", console)
        timings["mae"] = time.perf_counter() - t0
        if c.shared_mae:
            shared["dense"] = (copy.deepcopy(enc), mae, mae_curve)
    # 3. balanced clustering of unit-norm MAE features
    t0 = time.perf_counter()
    feats = extract_features(enc, pool.x_train)
    clustering, keys_tr, keys_te = _cluster(enc, feats, pool, c.num_clusters, c, seed)
    clustering.save(sd / "clusters.safetensors")
    timings["clustering"] = time.perf_counter() - t0
    # 4. placement by gradient magnitude under the MAE loss
    scores = _grad_scores(enc, mae, pool, c)
    blocks = list(c.blocks) if c.blocks is not None else by_scores(scores, c.moe_blocks)

    # 5. equal extra compute for MAE*, TokenMoE and MoCE (base lr x extra_lr_scale, paper 0.1)
    def continue_mae(model, name, data=pool, objective_cls=MAEObjective, **kw):
        t0 = time.perf_counter()
        trainer, summary = _continue(stages, c, seed, mae, model, data, sd / name, f"seed {seed}: {name}",
                                     objective_cls, **kw)
        timings[name] = time.perf_counter() - t0
        return trainer, summary

    mae_star = copy.deepcopy(enc)
    t_star, s_star = continue_mae(mae_star, "mae_star")
    token = VisionTransformer(moe=dict(num_experts=c.num_experts, top_k=1, placement=blocks, noise_std=1.0,
                                       renormalize=c.renormalize), **vit_args)
    token.load_state_dict(upcycle_state_dict(enc.state_dict(), blocks, c.num_experts, noise=0.01, seed=seed),
                          strict=False)
    t_tok, s_tok = continue_mae(token, "tokenmoe")
    moce = build_moce(enc, clustering, blocks=blocks, num_experts=c.num_experts, noise=0.01, seed=seed,
                      imbalance_weight=c.imbalance_weight, renormalize=c.renormalize)
    t_moce, s_moce = continue_mae(moce, "moce", data=pool.with_keys(keys_tr, keys_te), objective_cls=MoCEObjective,
                             teacher=enc, distill_weight=c.distill_weight)
    sdr = None
    if c.sdr:  # SDR(ViT): the same subsets (clusters), each to a random fixed expert, the same extra steps
        sdr = build_sdr(enc, clustering, blocks=blocks, num_experts=c.num_experts, noise=0.01, seed=seed)
        t_sdr, s_sdr = continue_mae(sdr, "sdr", data=pool.with_keys(keys_tr, keys_te),
                                    objective_cls=MoCEObjective, teacher=enc, distill_weight=c.distill_weight)
    sizes = torch.bincount(keys_tr, minlength=c.num_clusters)
    run = {"seed": seed, "blocks": blocks, "grad_scores": scores, "cluster_sizes": sizes.tolist(),
           "mae_loss": mae_curve,
           "recon": {"MAE*": s_star["test_recon_loss"], "TokenMoE": s_tok["test_recon_loss"],
                     "MoCE": s_moce["test_recon_loss"]},
           "tokenmoe_routing": s_tok["routing"], "moce_routing": s_moce["routing"], "acc": {}, "selection": {},
           "expert_choices": {str(k): v for k, v in expert_choices(moce).items()}}
    # reconstruction PSNR per downstream task (MoCE Fig. 3d) and class-by-expert routing (Fig. 3a/3c)
    cont = {"MAE*": (t_star, None), "TokenMoE": (t_tok, None), "MoCE": (t_moce, clustering)}
    if sdr is not None:
        run["recon"]["SDR"] = s_sdr["test_recon_loss"]
        cont["SDR"] = (t_sdr, clustering)
    rec = {name: {m: _reconstruction(t.objective, t.model, task.x_test[:512], enc, cl) for m, (t, cl) in cont.items()}
           for name, task in tasks.items()}
    run["psnr"] = {name: {m: v[0] for m, v in d.items()} for name, d in rec.items()}
    run["recon_task"] = {name: {m: v[1] for m, v in d.items()} for name, d in rec.items()}
    fine_y = mix.y_test
    tables = {"TokenMoE": class_expert_table(token, pool.x_test, fine_y, len(mix.classes)),
              "MoCE": class_expert_table(moce, pool.x_test, fine_y, len(mix.classes), routing_key=keys_te)}
    run["collapse"] = {m: {str(b): dominant_expert_share(t) for b, t in tb.items()} for m, tb in tables.items()}
    # 6. transfer: pick each task's cluster, deploy a dense ViT, fine-tune; baselines fine-tune as is
    backbones = {}
    for name, task in tasks.items():
        t0 = time.perf_counter()
        sel = select_cluster(enc, clustering, task.x_train)
        run["selection"][name] = {"cluster": sel.cluster, "share": sel.share, "histogram": sel.histogram.tolist(),
                                  "seconds": time.perf_counter() - t0}
        backbones[name] = {"MAE*": mae_star, "TokenMoE": token, "MoCE": deploy(moce, sel.cluster)}
        if sdr is not None:
            run.setdefault("sdr_search", {})[name] = pick = _sdr_search(stages, c, seed, sdr, sizes, task, sd, name)
            backbones[name]["SDR"] = deploy(sdr, pick["picked"])
    if first and len(c.finetune_lrs) > 1:  # small lr search on a validation split, reused for every seed
        for name, task in tasks.items():
            val = _val_split(task, seed)
            results["lr"][name] = {}
            for method, bb in backbones[name].items():
                accs = {lr: _finetune(stages, bb, val, c, seed, sd / f"lr_{method}_{name}_{lr:g}", lr)
                        for lr in c.finetune_lrs}
                results["lr"][name][method] = {"chosen": max(accs, key=accs.get), "val_acc": accs}
    for name, task in tasks.items():
        run["acc"][name] = {}
        run.setdefault("probe", {})[name] = {}
        if c.baselines:  # the same images: raw pixels, and the same fine-tune from random initialisation
            run.setdefault("baselines", {})[name] = {
                "pixel probe": pixel_probe(task),
                "random init": _finetune(stages, VisionTransformer(**vit_args), task, c, seed, sd / f"ft_random_{name}",
                                         c.finetune_lrs[0], pretrained=False)}
        for method, bb in backbones[name].items():
            ftr, fte = extract_features(bb, task.x_train), extract_features(bb, task.x_test)
            run["probe"][name][method] = linear_probe(ftr, task.y_train, fte, task.y_test, num_classes=task.num_classes)
            lr = results["lr"].get(name, {}).get(method, {}).get("chosen", c.finetune_lrs[0])
            tag = {"MAE*": "mae", "TokenMoE": "tok", "MoCE": "moce", "SDR": "sdr"}[method]
            run["acc"][name][method] = _finetune(stages, bb, task, c, seed, sd / f"ft_{tag}_{name}", lr)
        fmt = lambda d: ", ".join(f"{k} {v:.3f}" for k, v in d.items())  # noqa: E731
        base = run.get("baselines", {}).get(name)
        console.print(f"seed {seed} {name}: fine-tuned {fmt(run['acc'][name])}; linear probe {fmt(run['probe'][name])}"
                      + (f"; baselines {fmt(base)}" if base else ""))
        if base:
            for method, acc in run["acc"][name].items():
                if acc <= base["random init"]:
                    console.print(f"[bold yellow]warning:[/] {name}: pre-trained {method} ({acc:.3f}) does not beat "
                                  f"the same fine-tune from random initialisation ({base['random init']:.3f})")
    if first and c.compare_selection:
        lrs = {name: results["lr"].get(name, {}).get("MoCE", {}).get("chosen", c.finetune_lrs[0]) for name in tasks}
        run["selection_methods"] = _compare_selection(stages, c, seed, moce, sizes, tasks, run, sd, lrs)
    results["params"] = {"mae": count_parameters(enc)["total"], "tokenmoe_total": count_parameters(token)["total"],
                         "moce_total": count_parameters(moce)["total"],
                         "deployed_dense": count_parameters(backbones[next(iter(tasks))]["MoCE"])["total"]}
    if "speed" not in results:
        results["speed"] = _speed(enc, moce, token, c)
    run["timings_s"] = timings
    _save_plots(sd, mae, enc, moce, clustering, pool, keys_tr, c, tasks=run["selection"])
    _plot_routing(sd / "routing.png", tables, mix)
    return run


def _sdr_search(stages: _Stages, c: MoCEDemoConfig, seed: int, sdr: VisionTransformer, sizes: Tensor,
                task: TensorSplits, sd: Path, name: str) -> dict:
    """SDR's brute-force transfer: a short fine-tune of every distinct subnet on a validation
    split of the task; the best one is deployed."""
    cands = distinct_candidates(sdr, sizes)
    stages.add(len(cands) * c.selection_probe_steps)
    val = _val_split(task, seed)
    t0 = time.perf_counter()
    accs = {cl: _finetune(stages, deploy(sdr, cl), val, c, seed, sd / f"sdr_search_{name}_{cl}", c.finetune_lrs[0],
                          steps=c.selection_probe_steps) for cl in cands}
    return {"val_acc": {str(k): v for k, v in accs.items()}, "picked": max(accs, key=accs.get),
            "seconds": time.perf_counter() - t0}


def _compare_selection(stages: _Stages, c: MoCEDemoConfig, seed: int, moce: VisionTransformer, sizes: Tensor,
                       tasks: dict, run: dict, sd: Path, lrs: dict[str, float]) -> dict:
    """The paper's other ways to pick experts for a task (MoCE Table 5), on the candidates with
    distinct expert choices: k-NN accuracy and LogME of frozen features, early-stop search
    (short fine-tunes scored on a validation split) and exhaustive search (full fine-tunes:
    best and worst test accuracy)."""
    cands = distinct_candidates(moce, sizes)
    choice = expert_choices(moce)
    rep = {k: next(r for r in cands if choice[r] == choice[k]) for k in choice}  # cluster -> its candidate
    out = {"candidates": cands}
    stages.add(len(tasks) * len(cands) * (c.finetune_steps + c.selection_probe_steps))
    for name, task in tasks.items():
        lr = lrs[name]
        secs = {"largest cluster (MoCE)": run["selection"][name]["seconds"]}
        t0 = time.perf_counter()
        full = {cl: _finetune(stages, deploy(moce, cl), task, c, seed, sd / f"sel_full_{name}_{cl}", lr)
                for cl in cands}
        secs["exhaustive"] = time.perf_counter() - t0
        val = _val_split(task, seed)
        t0 = time.perf_counter()
        early = {cl: _finetune(stages, deploy(moce, cl), val, c, seed, sd / f"sel_early_{name}_{cl}", lr,
                               steps=c.selection_probe_steps) for cl in cands}
        secs["early-stop search"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        knn = score_candidates(moce, cands, task.x_train, task.y_train, method="knn", seed=seed)
        secs["k-NN"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        lme = score_candidates(moce, cands, task.x_train, task.y_train, method="logme", seed=seed)
        secs["LogME"] = time.perf_counter() - t0
        picks = {"largest cluster (MoCE)": rep[run["selection"][name]["cluster"]],
                 "k-NN": max(knn, key=knn.get), "LogME": max(lme, key=lme.get),
                 "early-stop search": max(early, key=early.get)}
        out[name] = {"test_acc": {str(k): v for k, v in full.items()}, "knn": knn, "logme": lme, "early": early,
                     "picked": {m: {"cluster": cl, "test_acc": full[cl]} for m, cl in picks.items()},
                     "exhaustive_best": max(full.values()), "exhaustive_worst": min(full.values()),
                     "seconds": secs}
    return out


@torch.no_grad()
def _reconstruction(objective: MAEObjective, model: VisionTransformer, x: Tensor, enc, clustering=None
                    ) -> tuple[float, float]:
    """``(psnr, mse)`` of the masked patches of ``x``: the mean PSNR (dB) in pixel space (the
    targets' per-patch normalisation undone with the true patch statistics, as MAE's
    visualisation does, which flatters the pictures) and the mean squared error in the
    normalised space the model is trained in (its MAE loss on these images). A MoCE model
    routes each image by its assigned cluster."""
    was = model.training
    model.eval()
    key = clustering.assign(extract_features(enc, x)) if clustering is not None else None
    out = objective.reconstruct(model, x, key, generator=torch.Generator().manual_seed(0))
    p, m = objective.patch_size, out["mask"]
    err = (_denorm(out["pred"], x, p).clamp(0, 1) - patchify(x, p)).pow(2).mean(-1)  # (B, N)
    mse = (err * m).sum(-1) / m.sum(-1)
    norm_err = (out["pred"] - objective.target(x)).pow(2).mean(-1)
    model.train(was)
    return (float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean()),
            float((norm_err * m).sum() / m.sum()))


def _plot_routing(path: Path, tables: dict, mix) -> None:
    """Class-by-expert share of tokens, TokenMoE vs MoCE, every MoE block (MoCE Fig. 3a/3c)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = max(len(t) for t in tables.values())
    fig, axes = plt.subplots(len(tables), ncol, figsize=(3.2 * ncol + 1, 0.22 * len(mix.classes) * len(tables) + 1),
                             squeeze=False)
    for r, (method, tb) in enumerate(tables.items()):
        for col, (blk, t) in enumerate(tb.items()):
            ax = axes[r, col]
            ax.imshow(t.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"{method}, block {blk}: share {dominant_expert_share(t):.0%}", fontsize=8)
            ax.set_xlabel("expert", fontsize=8)
            ax.set_xticks(range(t.shape[1]))
            ax.set_yticks(range(len(mix.classes)), mix.classes if col == 0 else [], fontsize=5)
    fig.suptitle("share of each class's tokens per expert ('share': most classes on one expert)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def _speed(enc: VisionTransformer, moce: VisionTransformer, token: VisionTransformer, c: MoCEDemoConfig,
           batch: int = 256, reps: int = 5) -> dict:
    """Inference images/s of the deployed dense ViT, the MoCE MoE (keyed), TokenMoE and the dense
    encoder (:func:`visionmoe.sweep.inference_throughput`, one run each)."""
    from ..sweep import inference_throughput

    x = torch.rand(batch, 1, c.img_size, c.img_size)
    key = torch.zeros(batch, dtype=torch.long)
    models = {"deployed dense ViT": (deploy(moce, 0), {}), "MoCE (all experts)": (moce, {"routing_key": key}),
              "TokenMoE": (token, {}), "MAE encoder (dense)": (enc, {})}
    return {name: inference_throughput(m, x, reps, **kw) for name, (m, kw) in models.items()}


def _summary_table(res: dict):
    from rich.table import Table

    n = len(res["runs"])
    t = Table(title="fine-tuned test accuracy" + (", mean ± std over seeds" if n > 1 else " (one seed)"))
    t.add_column("task")
    methods = list(next(iter(res["tasks"].values())))
    base = res.get("baselines") or {}
    extra = list(next(iter(base.values()))) if base else []
    for m in methods + extra:
        t.add_column(m if m in methods else f"[dim]{m}", justify="right")

    def fmt(d):
        return f"{d['mean']:.4f}" + (f" ± {d['std']:.4f}" if n > 1 else "")

    for task, m in res["tasks"].items():
        best = max(methods, key=lambda k: m[k]["mean"])
        rand = base.get(task, {}).get("random init")
        cells = [("[bold]" if k == best else "") + fmt(m[k]) + (" [red]†" if rand and m[k]["mean"] <= rand["mean"]
                                                                 else "") for k in methods]
        t.add_row(task, *cells, *[f"[dim]{fmt(base[task][b])}" for b in extra])
    return t


def _adapt_all(s: TensorSplits, size: int):
    from ..data import adapt

    return adapt(s.x_train, channels=1, size=size), s.y_train, adapt(s.x_test, channels=1, size=size), s.y_test


def _save_plots(sd: Path, mae: Trainer, enc, moce, clustering, pool: TensorSplits, keys, c: MoCEDemoConfig,
                tasks: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # loss curves: MAE pre-training, then the three continuations with equal extra compute
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    axes[0].plot(*logged_curve(mae.run_dir))
    axes[0].set_title("dense MAE pre-training", fontsize=9)
    for name, label in (("mae_star", "MAE*"), ("tokenmoe", "TokenMoE"), ("moce", "MoCE")):
        axes[1].plot(*logged_curve(sd / name, "recon_loss"), label=label)
    axes[1].set_title("continuation (equal steps): masked-patch loss", fontsize=9)
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("MAE loss")
    fig.tight_layout()
    fig.savefig(sd / "mae_loss.png", dpi=100)
    plt.close(fig)
    # reconstructions
    with torch.no_grad():
        enc.eval()
        x = pool.x_test[torch.randperm(len(pool.x_test), generator=torch.Generator().manual_seed(0))[:8]]
        out = mae.objective.reconstruct(enc, x, generator=torch.Generator().manual_seed(0))
        p = mae.objective.patch_size
        masked = unpatchify(
            torch.where(out["mask"].unsqueeze(-1).bool(), torch.zeros_like(out["target"]),
                        patchify(x, p)), p, 1, x.shape[-2], x.shape[-1])
        rec = unpatchify(_denorm(out["pred"], x, p), p, 1, x.shape[-2], x.shape[-1])
    fig, axes = plt.subplots(3, 8, figsize=(10, 4))
    for i in range(8):
        for r, img in enumerate((x[i, 0], masked[i, 0], rec[i, 0].clamp(0, 1))):
            axes[r, i].imshow(img.numpy(), cmap="gray")
            axes[r, i].axis("off")
    axes[0, 0].set_title("input", fontsize=8, loc="left")
    axes[1, 0].set_title("visible 25%", fontsize=8, loc="left")
    axes[2, 0].set_title("reconstruction", fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(sd / "reconstructions.png", dpi=100)
    plt.close(fig)
    # cluster sizes and example images
    sizes = torch.bincount(keys, minlength=clustering.num_clusters)
    shown = min(12, clustering.num_clusters)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 1.6]})
    axes[0].bar(range(len(sizes)), sizes.tolist())
    axes[0].set_xlabel("cluster")
    axes[0].set_ylabel("pre-training images")
    axes[0].set_title("Sinkhorn-Knopp clusters (argmax of Q)", fontsize=9)
    grid = []
    for k in range(shown):
        idx = (keys == k).nonzero().flatten()[:10]
        row = [pool.x_train[i, 0] for i in idx] + [torch.zeros(c.img_size, c.img_size)] * (10 - len(idx))
        grid.append(torch.cat(row, dim=1))
    axes[1].imshow(torch.cat(grid, dim=0).numpy(), cmap="gray")
    axes[1].set_title(f"10 images from each of clusters 0-{shown - 1} (one row per cluster)", fontsize=9)
    axes[1].axis("off")
    fig.tight_layout()
    fig.savefig(sd / "clusters.png", dpi=100)
    plt.close(fig)
    # cluster -> expert gate matrix of each MoCE layer, and where each task's images fall
    layers = moce.moe_layers()
    fig, axes = plt.subplots(1, len(layers) + 1, figsize=(4 * (len(layers) + 1), 4), squeeze=False)
    for ax, (blk, layer) in zip(axes[0], layers):
        with torch.no_grad():
            layer.router.eval()
            r = layer.router(torch.zeros(clustering.num_clusters, 1, 1), torch.arange(clustering.num_clusters))
        im = ax.imshow(r.probs.numpy(), aspect="auto", cmap="viridis")
        ax.scatter(r.indices[:, 0].numpy(), range(clustering.num_clusters), marker="x", color="red", s=12)
        ax.set_xlabel("expert (x: chosen)")
        ax.set_xticks(range(r.probs.shape[1]))
        ax.set_ylabel("cluster")
        ax.set_title(f"block {blk}: gate probabilities", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    ax = axes[0, -1]
    hist = torch.tensor([v["histogram"] for v in tasks.values()], dtype=torch.float)
    ax.imshow((hist / hist.sum(1, keepdim=True)).numpy(), aspect="auto", cmap="magma")
    ax.set_yticks(range(len(tasks)), list(tasks), fontsize=8)
    ax.set_xlabel("cluster")
    ax.set_title("share of each task's images per cluster", fontsize=9)
    fig.tight_layout()
    fig.savefig(sd / "cluster_expert.png", dpi=100)
    plt.close(fig)


def _denorm(pred, x, p):
    """Undo the per-patch normalisation of the targets, using the input's patch statistics."""
    t = patchify(x, p)
    return pred * (t.var(-1, keepdim=True) + 1e-6) ** 0.5 + t.mean(-1, keepdim=True)


def _method_table(title: str, table: dict, digits: int = 4, level: str = "##", seeds: int = 2,
                  baselines: dict | None = None) -> list[str]:
    """A markdown section: one row per task (mean ± std of each method, the best in bold; no
    ± with one seed) and the average over tasks; ``table[task][method]`` is a :func:`mean_std`
    dict. ``baselines[task][name]`` adds those columns; a method at or below the random-init
    fine-tune is marked with a dagger."""
    methods = list(next(iter(table.values())))
    extra = list(next(iter(baselines.values()))) if baselines else []
    lines = [f"{level} {title}", "", "| task | " + " | ".join(methods + [f"baseline: {b}" for b in extra]) + " |",
             "|---" * (len(methods) + len(extra) + 1) + "|"]

    def cell(d):  # no ± with one seed, nor for a baseline that is the same in every seed
        return f"{d['mean']:.{digits}f}" + (f" ± {d['std']:.{digits}f}" if seeds > 1 and d["std"] > 0 else "")

    flagged = False
    for task, m in table.items():
        best = max(methods, key=lambda k: m[k]["mean"])
        rand = (baselines or {}).get(task, {}).get("random init")
        cells = []
        for k in methods:
            v = cell(m[k])
            v = f"**{v}**" if k == best else v
            if rand is not None and m[k]["mean"] <= rand["mean"]:
                v += " †"
                flagged = True
            cells.append(v)
        cells += [cell(baselines[task][b]) for b in extra]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    means = {k: statistics.mean(table[t][k]["mean"] for t in table) for k in methods}
    # the baseline columns stay empty in the average row
    lines.append("| **average** | " + " | ".join(f"{means[k]:.{digits}f}" for k in methods) + " |" * (len(extra) + 1))
    if flagged:
        lines += ["", "**Warning: † marks a pre-trained encoder that does not beat the same fine-tune from random "
                  "initialisation; its number is not evidence for the method.**"]
    return [*lines, ""]


def _paired_lines(paired: dict) -> list[str]:
    from ..eval.stats import format_difference

    if not paired:
        return []
    lines = ["## Seed-paired differences of fine-tuned accuracy (95% t interval)", "",
             "`reproduced`: the interval excludes 0 in the claimed direction (a > b); `refuted`: it excludes 0 the "
             "other way; `not resolved`: it contains 0.", "", "| task | comparison (a - b) | difference |",
             "|---|---|---|"]
    for task, d in paired.items():
        lines += [f"| {task} | {k} | {format_difference(v)} |" for k, v in d.items()]
    return [*lines, ""]


def _search_cost_lines(sel: dict) -> list[str]:
    """MoCE Table 5: for each selection method, the mean test accuracy of its picks and its
    measured cost per downstream task, and the cost for 1, 10 and 100 tasks (every method
    is per task; MoCE's clustering was paid once during pre-training)."""
    tasks = [t for t in sel if t != "candidates" and "seconds" in sel[t]]
    if not tasks:
        return []
    methods = ["largest cluster (MoCE)", "k-NN", "LogME", "early-stop search", "exhaustive"]
    lines = ["Search cost (MoCE Table 5): accuracy of the pick and seconds spent choosing, mean over tasks; "
             "the cost grows linearly with the number of downstream tasks.", "",
             "| method | mean test accuracy of the pick | seconds per task | 10 tasks | 100 tasks |",
             "|---|---|---|---|---|"]
    for m in methods:
        acc = statistics.mean(sel[t]["exhaustive_best"] if m == "exhaustive" else sel[t]["picked"][m]["test_acc"]
                              for t in tasks)
        sec = statistics.mean(sel[t]["seconds"][m] for t in tasks)
        lines.append(f"| {m} | {acc:.4f} | {sec:.2f} | {10 * sec:.0f} | {100 * sec:.0f} |")
    return [*lines, ""]


def _write_report(out: Path, res: dict) -> None:
    cfg = res["config"]
    n = len(res["runs"])
    lines = ["# MoCE demo report", "",
             f"Pre-training pool: {cfg['per_source']} images per source from {cfg['sources']}; ViT {cfg['vit']}; "
             f"{cfg['mae_steps']} MAE steps (lr {cfg['mae_lr']:g}; "
             f"{'one dense MAE for every seed' if cfg.get('shared_mae') else 'one dense MAE per seed'}), then "
             f"{cfg['extra_steps']} extra steps each for MAE*, TokenMoE and MoCE "
             f"({cfg['num_experts']} experts, {cfg['num_clusters']} clusters); fine-tuning {cfg['finetune_steps']} "
             f"{cfg.get('finetune_optim', 'sgd')} steps (lr {cfg['finetune_lrs']}, layer decay "
             f"{cfg.get('finetune_layer_decay')} for pre-trained encoders, label smoothing "
             f"{cfg.get('label_smoothing', 0)}, augmentation {cfg.get('finetune_augment', 'none')}) on up to "
             f"{cfg['finetune_train_limit']} images per task; the baselines use the same images and the same "
             f"fine-tune. Seeds {[r['seed'] for r in res['runs']]}, {res['seconds'] / 60:.1f} min in total.", "",
             *_method_table("Fine-tuned accuracy per downstream task" + (" (mean ± std over seeds)" if n > 1 else
                                                                         " (one seed)"), res["tasks"], seeds=n,
                            baselines=res.get("baselines")),
             *_paired_lines(res.get("paired", {}))]
    if res.get("probe"):
        lines += _method_table("Linear probe on frozen features (same images" + ("; mean ± std over seeds)" if n > 1
                                                                                 else "; one seed)"), res["probe"],
                               seeds=n)
    if res.get("lr"):
        lines += ["Fine-tuning learning rate chosen on a validation split (first seed): "
                  + "; ".join(f"{t}: " + ", ".join(f"{m} {v['chosen']:g}" for m, v in d.items())
                              for t, d in res["lr"].items()), ""]
    p, sp = res.get("params", {}), res.get("speed", {})
    if p:
        lines += ["## Deployment: parameters and inference speed", "",
                  "| model | parameters | images/s (inference, one run) |", "|---|---|---|",
                  f"| deployed dense ViT (MoCE, one cluster's experts) | {p['deployed_dense']:,} | "
                  f"{sp.get('deployed dense ViT', float('nan')):.0f} |",
                  f"| MoCE with all experts | {p['moce_total']:,} | {sp.get('MoCE (all experts)', float('nan')):.0f} |",
                  f"| TokenMoE | {p['tokenmoe_total']:,} | {sp.get('TokenMoE', float('nan')):.0f} |",
                  f"| MAE encoder (dense) | {p['mae']:,} | {sp.get('MAE encoder (dense)', float('nan')):.0f} |", ""]
    for r in res["runs"]:
        s = r["seed"]
        lines += [f"## Seed {s}", "", f"Experts in blocks {r['blocks']} (MLP gradient norms under the MAE loss: "
                  + ", ".join(f"{v:.3g}" for v in r["grad_scores"]) + ").", "",
                  "Masked-patch reconstruction loss on held-out pool images after the extra steps (lower is "
                  "better): " + ", ".join(f"{k} {v:.4f}" for k, v in r["recon"].items()) + ".", "",
                  "Cluster chosen for each task (share of its images): "
                  + ", ".join(f"{t} -> {v['cluster']} ({v['share']:.0%})" for t, v in r["selection"].items()), "",
                  "Time per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in r.get("timings_s", {}).items()), "",
                  *([f"MAE pre-training loss, mean of the first / last tenth of the logged steps: "
                     f"{r['mae_loss']['first']:.4f} -> {r['mae_loss']['last']:.4f} "
                     + ("(falls)." if r["mae_loss"]["falls"] else "(**does not fall**: not evidence of learning)."),
                     ""] if "mae_loss" in r else []),
                  "Reconstruction PSNR (dB) on each task's test images (MoCE Fig. 3d; the predicted patches are "
                  "un-normalised with the true mean and std of each masked patch, which flatters the pictures and "
                  "compresses the gaps between methods): "
                  + "; ".join(f"{t}: " + ", ".join(f"{m} {v:.2f}" for m, v in d.items())
                              for t, d in r.get("psnr", {}).items()), "",
                  "Masked-patch error in the normalised space the models are trained in (their MAE loss on each "
                  "task's test images; lower is better, the fairer comparison): "
                  + "; ".join(f"{t}: " + ", ".join(f"{m} {v:.4f}" for m, v in d.items())
                              for t, d in r.get("recon_task", {}).items()), "",
                  "Routing collapse, the largest share of the pool's classes whose main expert is one "
                  "expert (1.0 = every class on the same expert): "
                  + "; ".join(f"{m} " + ", ".join(f"block {b} {v:.2f}" for b, v in d.items())
                              for m, d in r.get("collapse", {}).items()), "",
                  f"![loss curves](seed{s}/mae_loss.png)", "", f"![reconstructions](seed{s}/reconstructions.png)", "",
                  f"![clusters](seed{s}/clusters.png)", "", f"![cluster to expert](seed{s}/cluster_expert.png)", "",
                  f"![routing by class](seed{s}/routing.png)", ""]
        sel = r.get("selection_methods")
        if sel:
            lines += ["### Expert selection methods (MoCE Table 5)", "",
                      f"Candidates: clusters {sel['candidates']} (one per distinct expert choice). "
                      "Test accuracy of the dense model each method picks, after full fine-tuning:", "",
                      "| task | largest cluster (MoCE) | k-NN | LogME | early-stop search | exhaustive best "
                      "| exhaustive worst |", "|---|---|---|---|---|---|---|"]
            for t, d in sel.items():
                if t == "candidates":
                    continue
                pk = d["picked"]
                lines.append(f"| {t} | " + " | ".join(f"{pk[m]['test_acc']:.4f}" for m in pk)
                             + f" | {d['exhaustive_best']:.4f} | {d['exhaustive_worst']:.4f} |")
            lines += ["", *_search_cost_lines(sel)]
        if r.get("sdr_search"):
            lines += ["### SDR(ViT): brute-force subnet search (MoCE Table 3 baseline)", "",
                      "| task | subnets searched | picked | validation accuracy of the pick | search seconds "
                      "| MoCE selection seconds |", "|---|---|---|---|---|---|"]
            for t, d in r["sdr_search"].items():
                lines.append(f"| {t} | {len(d['val_acc'])} | {d['picked']} | {d['val_acc'][str(d['picked'])]:.4f} "
                             f"| {d['seconds']:.1f} | {r['selection'][t].get('seconds', float('nan')):.2f} |")
            lines.append("")
    from .._utils import atomic_write_bytes

    atomic_write_bytes(out / "report.md", "\n".join(lines).encode())
