"""Every protocol of a self-supervised paper on one backbone: linear probe, k-NN and few-shot
on frozen CLS features, the two semi-supervised protocols, routing consistency.

Semi-supervised, as CR-MoE (its "Semi-supervised and transfer few-shot learning" paragraph,
after SimCLR v2 and iBOT): with few labels (1 %) a linear classifier on *frozen* features;
with more (10 %) the whole network is fine-tuned *from the first layer of the MLP head*
(encoder -> Linear + BN + ReLU of the pre-training projector -> a new linear classifier), with
the learning rate chosen from a grid on a validation split held out from the training
images (never on test).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..data import TensorSplits
from .features import extract_features
from .protocols import few_shot, label_subset, linear_probe, routing_consistency
from .transfer import knn_accuracy

__all__ = ["evaluate_backbone", "semi_linear", "semi_finetune", "SEMI_LRS", "SHORT_SEMI_LRS", "head_first_layer"]

SEMI_LRS = (1e-5, 3e-5, 1e-4, 3e-4)  # CR-MoE's grid for the 10 % fine-tune (200 ImageNet epochs)
#: the same grid x 10, for the few hundred steps of the CPU study and ``visionmoe probe``
SHORT_SEMI_LRS = (1e-4, 3e-4, 1e-3, 3e-3)


def _subset(s: TensorSplits, idx: Tensor, *, test: tuple[Tensor, Tensor] | None = None) -> TensorSplits:
    xt, yt = test if test is not None else (s.x_test, s.y_test)
    return TensorSplits(s.name, s.x_train[idx], s.y_train[idx], xt, yt, s.classes)


def semi_linear(model: nn.Module, data: TensorSplits, fraction: float, *, seed: int = 0) -> dict:
    """Linear classifier on frozen CLS features of ``round(fraction * n_c)`` labelled training
    images per class; test accuracy on ``data``'s test split."""
    idx = label_subset(data.y_train, fraction=fraction, seed=seed)
    ftr = extract_features(model, data.x_train[idx], pool="cls")
    fte = extract_features(model, data.x_test, pool="cls")
    acc = linear_probe(ftr, data.y_train[idx], fte, data.y_test, num_classes=data.num_classes)
    return {"acc": acc, "protocol": "linear on frozen features", "labels": len(idx)}


def head_first_layer(source: nn.Module | dict | None, width: int) -> nn.Module | None:
    """The first layer (Linear + BN + ReLU) of a MoCo projector: from a
    :class:`~visionmoe.objectives.MoCoObjective` (or any module with ``projector``), or from an
    objective state dict holding ``projector.0.weight`` and ``projector.1.*``; ``None`` when
    there is none (or its input width is not ``width``)."""
    if source is None:
        return None
    if isinstance(source, nn.Module):
        proj = getattr(source, "projector", None)
        if proj is None or proj[0].in_features != width:
            return None
        return copy.deepcopy(nn.Sequential(proj[0], proj[1], nn.ReLU()))
    w = source.get("projector.0.weight")
    if w is None or w.shape[1] != width or "projector.1.running_mean" not in source:
        return None
    layer = nn.Sequential(nn.Linear(width, w.shape[0], bias=False), nn.BatchNorm1d(w.shape[0]), nn.ReLU())
    layer[0].weight.data.copy_(w)
    layer[1].load_state_dict({k[len("projector.1."):]: v for k, v in source.items() if k.startswith("projector.1.")})
    return layer


def _finetune_once(model: nn.Module, head: nn.Module | None, train: TensorSplits, lr: float, steps: int, seed: int,
                   run_dir: Path) -> float:
    from ..train import Trainer, config_from_dict

    m = copy.deepcopy(model)
    if head is None:
        m.reset_classifier(train.num_classes)
    else:
        first = copy.deepcopy(head)
        m.head = nn.Sequential(first, nn.Linear(first[0].out_features, train.num_classes))
    device = str(next(m.parameters()).device)  # where the backbone is
    cfg = {"data": {"name": train.name, "augment": "none", "batch_size": min(64, len(train.x_train))},
           "optim": {"name": "adamw", "lr": lr, "weight_decay": 0.05},
           "schedule": {"max_steps": steps, "warmup_epochs": 0.0, "min_lr": 0.0},
           "run": {"seed": seed, "progress": False, "print_eval": False, "log_every": 10**9,
                   "eval_every_epochs": 1e9, "checkpoint_every": 10**9, "keep_checkpoints": 0, "device": device}}
    return float(Trainer(config_from_dict(cfg), data=train, model=m, run_dir=run_dir).fit(overwrite=True)["test_acc"])


def semi_finetune(model: nn.Module, data: TensorSplits, fraction: float, *, head: nn.Module | None = None,
                  lrs: Sequence[float] = SEMI_LRS, steps: int = 300, seed: int = 0, val_size: int = 500,
                  run_dir: str | Path = "runs/probe") -> dict:
    """Fine-tune the whole network on ``round(fraction * n_c)`` labels per class, from the first
    layer of the MLP head when ``head`` is given (:func:`head_first_layer`), else from a new
    linear classifier. Each lr of ``lrs`` is tried with a validation split of up to
    ``val_size`` other training images (class-balanced); the best is then scored on test."""
    if not lrs:
        raise ValueError("semi_finetune needs at least one learning rate in `lrs`")
    idx = label_subset(data.y_train, fraction=fraction, seed=seed)
    rest = torch.ones(len(data.y_train), dtype=torch.bool)
    rest[idx] = False
    rest_idx = rest.nonzero().flatten()
    frac_val = min(1.0, val_size / max(1, len(rest_idx)))
    val_idx = rest_idx[label_subset(data.y_train[rest_idx], fraction=frac_val, seed=seed + 1)][:val_size]
    run_dir = Path(run_dir)
    tune = _subset(data, idx, test=(data.x_train[val_idx], data.y_train[val_idx]))  # validation as the test split
    val_acc = {}
    for lr in lrs:
        val_acc[f"{lr:g}"] = _finetune_once(model, head, tune, lr, steps, seed, run_dir / f"lr{lr:g}")
    best = max(val_acc, key=val_acc.get)  # the first of equals: the grid's order breaks ties
    acc = _finetune_once(model, head, _subset(data, idx), float(best), steps, seed, run_dir / "test")
    return {"acc": acc, "protocol": "fine-tune from the first MLP-head layer" if head is not None
            else "fine-tune from a linear head", "labels": len(idx), "lr": float(best), "val_acc": val_acc,
            "val_images": len(val_idx), "steps": steps}


def evaluate_backbone(model, tasks: dict[str, TensorSplits], *, shots=(4, 10), episodes: int = 5, seed: int = 0,
                      semi: TensorSplits | None = None, semi_linear_fractions: Sequence[float] = (),
                      semi_finetune_fractions: Sequence[float] = (), semi_steps: int = 300,
                      semi_lrs: Sequence[float] = SEMI_LRS, head: nn.Module | None = None,
                      consistency_x: Tensor | None = None, run_dir: Path | None = None) -> dict:
    """Linear probe, k-NN (k 20) and few-shot accuracy per task on frozen CLS features;
    :func:`semi_linear` / :func:`semi_finetune` on label fractions of ``semi``; routing
    consistency of a MoE model on ``consistency_x``."""
    out: dict = {"linear": {}, "knn": {}, "few_shot": {}, "semi": {}}
    for name, t in tasks.items():
        ftr = extract_features(model, t.x_train, pool="cls")
        fte = extract_features(model, t.x_test, pool="cls")
        out["linear"][name] = linear_probe(ftr, t.y_train, fte, t.y_test, num_classes=t.num_classes)
        out["knn"][name] = knn_accuracy(ftr, t.y_train, fte, t.y_test, k=20, num_classes=t.num_classes)
        out["few_shot"][name] = {str(s): few_shot(ftr, t.y_train, fte, t.y_test, shots=s, episodes=episodes,
                                                  seed=seed, num_classes=t.num_classes) for s in shots}
    if (semi_linear_fractions or semi_finetune_fractions) and semi is None:
        raise ValueError("semi-supervised fractions need the labelled data set `semi`")
    for frac in semi_linear_fractions:
        out["semi"][f"linear {frac:g}"] = semi_linear(model, semi, frac, seed=seed)
    for frac in semi_finetune_fractions:
        out["semi"][f"finetune {frac:g}"] = semi_finetune(
            model, semi, frac, head=head, lrs=semi_lrs, steps=semi_steps, seed=seed,
            run_dir=(run_dir or Path("runs/probe")) / f"semi_{frac:g}")
    if consistency_x is not None and hasattr(model, "moe_layers") and model.moe_layers():
        out["consistency"] = {str(b): v for b, v in routing_consistency(model, consistency_x, seed=seed).items()}
    return out
