"""What an experiment is built from: seeds, the lr schedule, the model and the optimizer."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..models import create_model
from .checkpoint import ForeignCheckpointError, load_checkpoint
from .config import ConfigError, ExperimentConfig

__all__ = ["TrainingDiverged", "seed_everything", "cosine_lr", "build_model", "build_optimizer", "FUSED_OPTIMIZERS"]


class TrainingDiverged(RuntimeError):
    """Too many steps had a NaN/Inf loss or gradient (``run.max_skipped_steps``)."""


class RunExistsError(ValueError):
    """A new run was started in a folder that holds another run's checkpoints."""


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; optionally make torch use deterministic algorithms."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - seeds the legacy global RNG that third-party code uses
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def cosine_lr(step: int, *, base: float, total: int, warmup: int, min_lr: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from ``base`` to ``min_lr``."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * t))


_POSITIVE_MODEL_ARGS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "in_chans", "mlp_ratio")


def _check_model_args(name: str, args: dict) -> None:
    """Shapes a ViT cannot have are refused before torch sees them, naming the key."""
    from ..models import model_args

    merged = {**model_args(name), **args}
    for key in _POSITIVE_MODEL_ARGS:
        value = merged.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"model.args.{key} must be a positive number, got {value!r}")
    width, heads = merged.get("embed_dim"), merged.get("num_heads")
    if isinstance(width, int) and isinstance(heads, int) and width % heads:
        raise ConfigError(f"model.args: embed_dim {width} is not divisible by num_heads {heads}; pick heads that "
                          f"divide the width (e.g. {max(h for h in range(1, heads + 1) if width % h == 0)})")


def build_model(cfg: ExperimentConfig, *, num_classes: int, in_chans: int) -> nn.Module:
    """The model an experiment describes: variant + args + MoE overrides (or dense)."""
    args = {"num_classes": num_classes, "in_chans": in_chans, **cfg.model.args}
    _check_model_args(cfg.model.name, args)
    if cfg.model.dense:
        args["moe"] = None
    elif cfg.moe:
        args["moe"] = dict(cfg.moe)
    model = create_model(cfg.model.name, **args)
    if cfg.model.init:
        from ..models import load_dense_into_moe, load_state_dict_file

        if str(cfg.model.init).endswith(".safetensors"):
            try:
                sd = load_checkpoint(cfg.model.init)["model"]  # a visionmoe run checkpoint
            except ForeignCheckpointError:  # plain weights (timm, DINOv2, ...)
                sd = load_state_dict_file(cfg.model.init)
        else:
            sd = load_state_dict_file(cfg.model.init)
        load_dense_into_moe(model, sd, noise=cfg.model.init_noise, seed=cfg.run.seed, skip=tuple(cfg.model.init_skip),
                            shared_init=cfg.model.init_shared)
    return model


#: timm optimizer names that map to a torch optimizer with a fused kernel (CPU and CUDA)
FUSED_OPTIMIZERS = ("adam", "adamw")


def build_optimizer(model: nn.Module, cfg, extra: nn.Module | None = None) -> torch.optim.Optimizer:
    """timm optimizer over parameter groups: no weight decay on 1-d parameters and
    ``model.no_weight_decay()``; optional layer-wise lr decay (timm); router parameters get
    ``router_lr_scale`` times the lr. ``extra`` (an objective's own parameters, e.g. the MAE
    decoder) gets plain weight-decay groups."""
    from timm.optim import create_optimizer_v2
    from timm.optim._param_groups import param_groups_layer_decay, param_groups_weight_decay

    no_wd = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if cfg.layer_decay is not None:
        groups = param_groups_layer_decay(model, cfg.weight_decay, no_weight_decay_list=no_wd,
                                          layer_decay=cfg.layer_decay)
    else:
        groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=no_wd)
    router_ids = {id(p) for n, p in model.named_parameters() if ".router." in n}
    out = []
    for g in groups:
        params = list(g["params"])
        rest = {k: v for k, v in g.items() if k != "params"}
        plain = [p for p in params if id(p) not in router_ids]
        routed = [p for p in params if id(p) in router_ids]
        if plain:
            out.append({**rest, "params": plain})
        if routed:
            out.append({**rest, "params": routed, "lr_scale": rest.get("lr_scale", 1.0) * cfg.router_lr_scale})
    if extra is not None and any(True for _ in extra.parameters()):
        out += param_groups_weight_decay(extra, cfg.weight_decay)
    kwargs = {"momentum": cfg.momentum} if cfg.name in ("sgd", "momentum", "nesterov") else {}
    if cfg.fused and cfg.name.lower() in FUSED_OPTIMIZERS:
        kwargs["fused"] = True
    return create_optimizer_v2(out, opt=cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay, **kwargs)
