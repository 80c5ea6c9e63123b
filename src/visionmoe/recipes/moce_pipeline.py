"""The MoCE pipeline's stages, shared by the demo (:mod:`.moce_demo`), its analyses
(:mod:`.moce_studies`) and the bundle (:mod:`.moce_bundle`): the training-config builder, the one
progress bar, subsets and validation splits, the fine-tuning protocol, the pixel baseline, the
clustering of the pool, the placement probe, the equal extra MAE compute, the dense MAE."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..analysis import gradient_magnitude_scores
from ..clustering import ClusterConfig, fit_clusters
from ..data import TensorSplits
from ..eval import extract_features, linear_probe
from ..models import VisionTransformer
from ..objectives import MAEObjective
from ..train import Trainer, config_from_dict
from .common import curve_summary, logged_curve

if TYPE_CHECKING:
    from .moce_demo import MoCEDemoConfig

__all__ = ["train_config", "mae_kwargs", "progress_bar", "Stages", "subset", "val_split", "finetune", "TASK_AUGMENT",
           "task_augment", "finetune_warmup_epochs",
           "pixel_probe", "cluster_pool", "grad_scores", "continue_mae", "pretrain_dense", "adapt_all"]


def train_config(objective: str, steps: int, bs: int, lr: float, optim: str = "adamw", seed: int = 0, wd: float = 0.05,
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

def mae_kwargs(c: MoCEDemoConfig) -> dict:
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

class Stages:
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

def subset(task: TensorSplits, n: int | None, n_test: int | None, seed: int) -> TensorSplits:
    g = torch.Generator().manual_seed(seed)
    xtr, ytr, xte, yte = task.x_train, task.y_train, task.x_test, task.y_test
    if n is not None and len(xtr) > n:
        idx = torch.randperm(len(xtr), generator=g)[:n]
        xtr, ytr = xtr[idx], ytr[idx]
    if n_test is not None and len(xte) > n_test:
        idx = torch.randperm(len(xte), generator=torch.Generator().manual_seed(10_000))[:n_test]  # same for seeds
        xte, yte = xte[idx], yte[idx]
    return TensorSplits(task.name, xtr, ytr, xte, yte, task.classes)

def val_split(task: TensorSplits, seed: int, fraction: float = 0.2) -> TensorSplits:
    """Hold out ``fraction`` of the training images as the 'test' split (for searches)."""
    perm = torch.randperm(len(task.x_train), generator=torch.Generator().manual_seed(seed + 777))
    n_val = max(1, round(len(perm) * fraction))
    val, tr = perm[:n_val], perm[n_val:]
    return TensorSplits(task.name, task.x_train[tr], task.y_train[tr], task.x_train[val], task.y_train[val],
                        task.classes)

#: ``finetune_augment: auto``: augmentation that keeps each bundled task's labels. Shifts of up
#: to 1/8 and rotations of up to 10 degrees for digits (a mirror changes a digit; MNIST after
#: the demo's MAE, validation accuracy: 0.957 at 750 steps vs 0.934 at 500 without) and, as the
#: safe choice, for any other set; flips for clothes and textures (Fashion-MNIST validation:
#: crops + flips 0.760-0.780, flips 0.774, none 0.785 — nothing tried beat no augmentation
#: there; flips cost ~nothing). docs/moce.md has the table.
TASK_AUGMENT = {"mnist": "shift", "mnist5k": "shift", "digits": "shift", "fashion_mnist": "flip",
                "textures": "flip"}


def task_augment(setting: str, task: str) -> str:
    """The augmentation a fine-tune of ``task`` uses: ``setting`` itself, or with ``auto`` the
    task's entry of :data:`TASK_AUGMENT` (``shift`` for a set not in it)."""
    return TASK_AUGMENT.get(task, "shift") if setting == "auto" else setting


def finetune_warmup_epochs(c: MoCEDemoConfig, steps: int, num_images: int) -> float:
    """The fine-tune's warm-up (``finetune_warmup`` of its ``steps``) in epochs of ``num_images``."""
    return c.finetune_warmup * steps * c.finetune_batch_size / max(1, num_images)


def finetune(stages: Stages, backbone: VisionTransformer, task: TensorSplits, c: MoCEDemoConfig, seed: int,
              run_dir: Path, lr: float, steps: int | None = None, pretrained: bool = True) -> float:
    """Fine-tune a copy of ``backbone`` with a new head on ``task`` with the demo's one protocol
    (see :class:`MoCEDemoConfig`; layer-wise lr decay only for a pre-trained backbone); returns
    its test accuracy."""
    model = copy.deepcopy(backbone)
    model.reset_classifier(task.num_classes, global_pool="avg")
    model.head.reset_parameters()
    steps = steps or c.finetune_steps
    warmup = finetune_warmup_epochs(c, steps, len(task.x_train))
    cfg = train_config("classification", steps, c.finetune_batch_size, lr, optim=c.finetune_optim, seed=seed,
               wd=c.finetune_weight_decay, augment=task_augment(c.finetune_augment, task.name),
               warmup_epochs=warmup,
               layer_decay=c.finetune_layer_decay if pretrained else None, label_smoothing=c.label_smoothing)
    return stages.train(model, task, cfg, run_dir, f"fine-tune {run_dir.name}")[1]["test_acc"]

def pixel_probe(task: TensorSplits) -> float:
    """The baseline anyone can compute: a linear probe on the raw pixels of the same images."""
    return linear_probe(task.x_train.flatten(1), task.y_train, task.x_test.flatten(1), task.y_test,
                        num_classes=task.num_classes)

def cluster_pool(enc: VisionTransformer, feats: Tensor, pool: TensorSplits, k: int, c: MoCEDemoConfig, seed: int):
    """Balanced clustering of the pool's unit-norm features (``feats``) into ``k`` clusters;
    returns the clustering, the training images' balanced assignments (Q of eq. 2) and the
    test images' nearest centroids."""
    clustering = fit_clusters(feats, ClusterConfig(num_clusters=k, batch_size=512, seed=seed, center=c.cluster_center),
                              feature_source=f"seed{seed}/mae")
    return clustering, clustering.assign_balanced(feats), clustering.assign(extract_features(enc, pool.x_test))

def grad_scores(enc: VisionTransformer, mae: Trainer, pool: TensorSplits, c: MoCEDemoConfig) -> list[float]:
    """MAE-loss gradient magnitude of each block's MLP (MoCE's placement), on 4 batches."""
    probe = MAEObjective(enc, **mae_kwargs(c))
    probe.decoder.load_state_dict(mae.objective.decoder.state_dict())
    batches = [(pool.x_train[i : i + c.batch_size],) for i in range(0, 4 * c.batch_size, c.batch_size)]
    return gradient_magnitude_scores(enc, batches, lambda m, b: probe(m, b)["loss"])

def continue_mae(stages: Stages, c: MoCEDemoConfig, seed: int, mae: Trainer, model: VisionTransformer,
              data: TensorSplits, run_dir: Path, label: str, objective_cls=MAEObjective, **kw):
    """``extra_steps`` more MAE steps for ``model`` from the dense run (its decoder included), at
    ``mae_lr x extra_lr_scale``: the equal extra compute of MAE*, TokenMoE, MoCE and SDR."""
    mk = mae_kwargs(c)
    obj = objective_cls(model, **kw, **mk)
    obj.decoder.load_state_dict(mae.objective.decoder.state_dict())
    extra = train_config("mae", c.extra_steps, c.batch_size, c.mae_lr * c.extra_lr_scale, seed=seed, **mk)
    return stages.train(model, data, extra, run_dir, label, objective=obj)

def pretrain_dense(stages: Stages, c: MoCEDemoConfig, seed: int, pool: TensorSplits, run_dir: Path, label: str,
                   console) -> tuple[VisionTransformer, Trainer, dict]:
    """Dense MAE pre-training of the demo's ViT on ``pool``: ``(encoder, its trainer, loss
    curve summary)``; warns when the loss did not fall."""
    torch.manual_seed(seed)
    mk = mae_kwargs(c)
    enc = VisionTransformer(img_size=c.img_size, in_chans=1, num_classes=0, **c.vit)
    mae, _ = stages.train(enc, pool, train_config("mae", c.mae_steps, c.batch_size, c.mae_lr, seed=seed,
                                          warmup_epochs=c.mae_warmup, **mk), run_dir, label)
    curve = curve_summary(logged_curve(run_dir)[1])  # means of the first and the last tenth of the logged steps
    if not curve["falls"]:
        console.print(f"[bold yellow]warning:[/] {label}: the MAE loss did not fall ({curve['first']:.3f} -> "
                      f"{curve['last']:.3f}); its features are not evidence of pre-training")
    return enc, mae, curve

def adapt_all(s: TensorSplits, size: int):
    from ..data import adapt

    return adapt(s.x_train, channels=1, size=size), s.y_train, adapt(s.x_test, channels=1, size=size), s.y_test


def finetune_tasks(stages: Stages, c: MoCEDemoConfig, seed: int, run: dict, results: dict, tasks: dict,
                   backbones: dict, sd: Path, vit_args: dict, *, first: bool, console) -> None:
    """The lr search (first seed), then each task's fine-tune and linear probe of every backbone,
    beside the pixel probe and the same fine-tune from random initialisation; warns when a
    pre-trained backbone does not beat random initialisation."""
    if first and len(c.finetune_lrs) > 1:  # small lr search on a validation split, reused for every seed
        for name, task in tasks.items():
            val = val_split(task, seed)
            results["lr"][name] = {}
            for method, bb in backbones[name].items():
                accs = {lr: finetune(stages, bb, val, c, seed, sd / f"lr_{method}_{name}_{lr:g}", lr)
                        for lr in c.finetune_lrs}
                results["lr"][name][method] = {"chosen": max(accs, key=accs.get), "val_acc": accs}
    for name, task in tasks.items():
        run["acc"][name] = {}
        run.setdefault("probe", {})[name] = {}
        if c.baselines:  # the same images: raw pixels, and the same fine-tune from random initialisation
            run.setdefault("baselines", {})[name] = {
                "pixel probe": pixel_probe(task),
                "random init": finetune(stages, VisionTransformer(**vit_args), task, c, seed, sd / f"ft_random_{name}",
                                         c.finetune_lrs[0], pretrained=False)}
        for method, bb in backbones[name].items():
            ftr, fte = extract_features(bb, task.x_train), extract_features(bb, task.x_test)
            run["probe"][name][method] = linear_probe(ftr, task.y_train, fte, task.y_test, num_classes=task.num_classes)
            lr = results["lr"].get(name, {}).get(method, {}).get("chosen", c.finetune_lrs[0])
            tag = {"MAE*": "mae", "TokenMoE": "tok", "MoCE": "moce", "SDR": "sdr"}[method]
            run["acc"][name][method] = finetune(stages, bb, task, c, seed, sd / f"ft_{tag}_{name}", lr)
        fmt = lambda d: ", ".join(f"{k} {v:.3f}" for k, v in d.items())  # noqa: E731
        base = run.get("baselines", {}).get(name)
        console.print(f"seed {seed} {name}: fine-tuned {fmt(run['acc'][name])}; linear probe {fmt(run['probe'][name])}"
                      + (f"; baselines {fmt(base)}" if base else ""))
        if base:
            for method, acc in run["acc"][name].items():
                if acc <= base["random init"]:
                    console.print(f"[bold yellow]warning:[/] {name}: pre-trained {method} ({acc:.3f}) does not beat "
                                  f"the same fine-tune from random initialisation ({base['random init']:.3f})")
