"""``train_classifier``: train a model on in-memory tensors with the :class:`Trainer`
(the same loop, optimizer groups, schedule and MoE auxiliary losses), without a config file."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from ..data import TensorSplits, adapt

__all__ = ["train_classifier", "evaluate"]


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 256, img_size: int | None = None) -> float:
    """Top-1 accuracy of ``model`` on tensors ``x: (N, C, H, W)``, ``y: (N,)``."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = model(adapt(x[i : i + batch_size], size=img_size))
        correct += (logits.argmax(-1) == y[i : i + batch_size]).sum().item()
    return correct / max(len(x), 1)


def train_classifier(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: float = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup_epochs: float = 1.0,
    img_size: int | None = None,
    augment: str = "none",
    seed: int = 0,
    progress: bool = True,
    run_dir: str | Path | None = None,
) -> dict:
    """Train ``model`` with cross-entropy + its MoE auxiliary losses (AdamW, warm-up + cosine).

    Returns ``{"loss": [per step], "aux_loss": [...], "train_seconds", "images_per_second"}``.
    Logs and checkpoints go to ``run_dir`` (a temporary folder by default).
    """
    from .config import config_from_dict
    from .loop import Trainer

    num_classes = int(y.max()) + 1 if len(y) else 0
    data = TensorSplits("tensors", x, y, x[:0], y[:0], [str(i) for i in range(num_classes)])
    cfg = config_from_dict({
        "data": {"name": "tensors", "augment": augment, "batch_size": batch_size, "img_size": img_size},
        "optim": {"lr": lr, "weight_decay": weight_decay},
        "schedule": {"epochs": epochs, "warmup_epochs": warmup_epochs},
        "run": {"seed": seed, "progress": progress, "log_every": 1, "eval_every_epochs": 1e9,
                "checkpoint_every": 10**9, "keep_checkpoints": 0,
                "device": str(next(model.parameters()).device)},  # train where the caller's model is
    })
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, data=data, model=model, run_dir=run_dir or tmp)
        summary = trainer.fit(overwrite=True)
        rows = [json.loads(ln) for ln in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    return {"loss": [r["loss"] for r in rows], "aux_loss": [r["aux_loss"] for r in rows],
            "train_seconds": summary["train_seconds"], "images_per_second": summary["train_img_per_s"]}
