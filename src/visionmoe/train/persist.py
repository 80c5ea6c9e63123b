"""A Trainer's state in and out of checkpoints, and the gradient step that must agree across
ranks (data-parallel averaging, expert shards, the clipped norm). Checkpoints always hold
the layout-independent form (full ``(E, ...)`` expert tensors, CPU), so they load on any
device and any number of processes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..moe.parallel import (
    gather_expert_state,
    gather_optimizer_state,
    reduce_gradients,
    shard_expert_state,
    shard_optimizer_state,
    sharded_parameters,
)
from .checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from .config import ExperimentConfig, config_from_dict, config_to_dict
from .distributed import barrier
from .state import CheckpointState, build_from_spec

if TYPE_CHECKING:
    from .loop import Trainer

__all__ = ["save_state", "load_state", "gradient_step_norm", "load_trained_model", "rebuild_model"]


def _full_states(t: Trainer) -> tuple[dict, dict, dict | None, dict | None]:
    """Model, optimizer, EMA and objective state with expert shards gathered (collective)."""
    model_sd, optim_sd = t.model.state_dict(), t.optimizer.state_dict()
    ema_sd = t.ema.module.state_dict() if t.ema is not None else None
    obj = t.objective.state_dict()
    if t.expert_parallel > 1:
        model_sd = gather_expert_state(t.model, model_sd)
        optim_sd = gather_optimizer_state(t.optimizer, t.model, optim_sd)
        if ema_sd is not None:
            ema_sd = gather_expert_state(t.ema.module, ema_sd)
        obj = gather_expert_state(t.objective, obj)
    return model_sd, optim_sd, ema_sd, obj


def _cpu(sd: Any) -> Any:
    if isinstance(sd, Tensor):
        return sd.detach().cpu()
    if isinstance(sd, dict):
        return {k: _cpu(v) for k, v in sd.items()}
    if isinstance(sd, list):
        return [_cpu(v) for v in sd]
    return sd


def first_nonfinite(sd: dict[str, Tensor]) -> str | None:
    """The name of the first floating-point tensor of ``sd`` holding a NaN or Inf, or ``None``."""
    for k, v in sd.items():
        if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return k
    return None


def save_state(t: Trainer) -> Path:
    """Write ``step_<N>.safetensors`` (rank 0; the other ranks wait) and prune old ones."""
    path = t.checkpoint_dir / f"step_{t.step:08d}.safetensors"
    model_sd, optim_sd, ema_sd, obj = _full_states(t)  # collective with expert parallelism
    bad = first_nonfinite(model_sd)
    if bad is not None:  # never write a checkpoint that cannot be used; the older ones stay
        from .build import TrainingDiverged

        raise TrainingDiverged(f"step {t.step}: the weights became NaN/Inf ({bad}); no checkpoint was written, the "
                               f"older ones in {t.checkpoint_dir} are kept (lower optim.lr or set optim.clip_grad)")
    if not t.dist.is_main:
        barrier(t.dist)
        return path
    state = CheckpointState(step=t.step, skipped_steps=t.skipped_steps, config=config_to_dict(t.cfg),
                            num_classes=t.data.num_classes, in_chans=t.channels, img_size=t.img_size,
                            classes=list(t.data.classes), preprocessing=t.preprocessing.to_dict(),
                            model_spec=t.model_spec)
    save_checkpoint(path, model=_cpu(model_sd), optimizer=_cpu(optim_sd), ema=_cpu(ema_sd), objective=_cpu(obj),
                    state=state.to_dict())
    ckpts = sorted(t.checkpoint_dir.glob("step_*.safetensors"))
    for old in ckpts[: max(0, len(ckpts) - t.cfg.run.keep_checkpoints)]:
        old.unlink()
    barrier(t.dist)
    return path


#: config keys a resume may change without being told: how the run is shown, where it computes and
#: how its experts are laid out over processes (checkpoints move between layouts)
RESUME_SAFE_KEYS = ("run.progress", "run.print_eval", "run.threads", "run.tensorboard", "run.device", "data.workers",
                    "data.eval_batch_size", "run.log_every", "moe.expert_parallel")


def flat_config(d: Any, prefix: str = "") -> dict[str, Any]:
    """A config dict as ``{dotted key: value}`` (a model's ``args`` / ``objective_args`` stay one value)."""
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in ("args", "objective_args"):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_safe(key: str, allow: tuple[str, ...] = ()) -> bool:
    """Whether a resume may change the dotted ``key`` unasked: one of :data:`RESUME_SAFE_KEYS` or
    ``allow`` (a key or a section, e.g. ``schedule``)."""
    return any(key == o or key.startswith(o + ".") for o in (*RESUME_SAFE_KEYS, *allow))


def config_changes(stored: dict, current: dict, allow: tuple[str, ...] = ()) -> list[str]:
    """The dotted keys whose values differ between a checkpoint's config and the current one
    (keys only one of them has, e.g. from another visionmoe version, do not count), minus
    :data:`RESUME_SAFE_KEYS` and ``allow`` (a key or a section, e.g. ``schedule``)."""
    a, b = flat_config(stored), flat_config(current)
    return sorted(k for k in a.keys() & b.keys() if a[k] != b[k] and not resume_safe(k, allow))


def load_state(t: Trainer, path: str | Path, *, allow_changes: tuple[str, ...] | None = None) -> None:
    """Load a checkpoint into the trainer. With ``allow_changes`` (a resume), a config that
    differs from the checkpoint's in other keys is refused."""
    from ..models import load_matching_state_dict

    ck = load_checkpoint(path)  # full expert tensors on the CPU; each rank keeps the rows of its experts
    if allow_changes is not None:
        changed = config_changes(ck["state"].get("config") or {}, config_to_dict(t.cfg), allow_changes)
        if changed:
            old, new = flat_config(ck["state"]["config"]), flat_config(config_to_dict(t.cfg))
            what = "; ".join(f"{k}: {old[k]!r} -> {new[k]!r}" for k in changed[:4])
            raise ValueError(f"the run in {t.run_dir} was started with another config ({what}); resume with the "
                             f"same config, or allow it with --allow-change {changed[0]}")
    load_matching_state_dict(t.model, shard_expert_state(t.model, ck["model"]), f"checkpoint {path}")
    if ck["optimizer"] is not None:  # torch moves the moments to each parameter's device
        t.optimizer.load_state_dict(shard_optimizer_state(t.optimizer, t.model, ck["optimizer"]))
    if ck["objective"] is not None:
        t.objective.load_state_dict(shard_expert_state(t.objective, ck["objective"]))
    if t.ema is not None and ck["ema"] is not None:
        t.ema.module.load_state_dict(shard_expert_state(t.ema.module, ck["ema"]))
    if ck["rng"] is not None:
        set_rng_state(*ck["rng"])
    st = CheckpointState.from_dict(ck["state"])
    t.step, t.skipped_steps = st.step, st.skipped_steps


# ---------------------------------------------------------------------------- gradients
def _trainable(t: Trainer) -> list[Tensor]:
    return [p for p in (*t.model.parameters(), *t.objective.parameters()) if p.requires_grad]


def _sharded(t: Trainer) -> dict:
    """Expert shards (parameter id -> shard) of the model and the objective."""
    if t.expert_parallel == 1:
        return {}
    return sharded_parameters(t.model) | sharded_parameters(t.objective)


def gradient_step_norm(t: Trainer) -> float:
    """Average the gradients over the ranks, then return the total gradient norm (clipped to
    ``optim.clip_grad`` when set).

    Data parallelism is one all-reduce of a flat buffer (DistributedDataParallel's arithmetic),
    done explicitly rather than with the DDP wrapper because objectives call several model
    methods and several forwards per step (MAE's ``forward_visible``, MoCo's two views), which
    DDP's reducer does not support. A parameter without a gradient on some rank contributes
    zeros; one without a gradient on every rank keeps ``grad=None``. With expert parallelism the
    expert shards' squares are summed over the expert-parallel group, so every rank clips by the
    norm of the whole model."""
    if t.dist.enabled:
        reduce_gradients(_trainable(t), _sharded(t), t.dist.world)
    params = [p for p in t.model.parameters() if p.grad is not None]
    clip = t.cfg.optim.clip_grad
    if t.expert_parallel > 1:
        import torch.distributed as dist

        sharded = _sharded(t)
        dev = params[0].device if params else t.device
        sq = [torch.zeros((), dtype=torch.float64, device=dev), torch.zeros((), dtype=torch.float64, device=dev)]
        for p in params:
            sq[id(p) in sharded] += torch.linalg.vector_norm(p.grad).double() ** 2
        dist.all_reduce(sq[1], group=next(iter(sharded.values())).group)
        total = (sq[0] + sq[1]).sqrt().float()
        if clip:
            coef = torch.clamp(clip / (total + 1e-6), max=1.0)
            for p in params:
                p.grad.mul_(coef)
        return float(total)
    if clip:
        return float(torch.nn.utils.clip_grad_norm_(params, clip))
    if not params:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))


def vit_model_config(model: nn.Module) -> dict:
    """The ``model:`` section that builds ``model``'s dense ViT shape from the registry (a ViT
    variant with its constructor arguments; classes and channels come from the data)."""
    skip = ("moe", "num_classes", "in_chans")
    return {"name": "vit_tiny_patch4_32",
            "args": {k: v for k, v in getattr(model, "init_kwargs", {}).items() if k not in skip}}


def save_model(path: str | Path, model: nn.Module, *, preprocessing, classes: list[str] | None = None,
               config: dict | None = None) -> Path:
    """Write ``model`` alone (no optimizer) as a checkpoint that :func:`load_trained_model`,
    ``visionmoe info / eval / predict / export`` and ``model.init=`` read: its weights, its
    model spec, ``preprocessing`` (a :class:`~visionmoe.data.preprocess.Preprocessing`), the
    class names and an experiment ``config`` (default: a registered ViT variant with the
    model's constructor arguments, so a dense ViT also rebuilds from the config alone)."""
    from .state import model_spec

    spec = model_spec(model)
    if config is None:
        config = config_to_dict(config_from_dict({"model": vit_model_config(model)}))
    num_classes = int(getattr(model, "num_classes", 0))
    state = CheckpointState(step=0, config=config, num_classes=num_classes, in_chans=preprocessing.channels,
                            img_size=preprocessing.size, classes=list(classes or []),
                            preprocessing=preprocessing.to_dict(), model_spec=spec)
    return save_checkpoint(path, model=_cpu(model.state_dict()), state=state.to_dict(), rng=False)


# ---------------------------------------------------------------------------- loading for use
def load_trained_model(path: str | Path, *, device: str | torch.device = "cpu"
                       ) -> tuple[nn.Module, ExperimentConfig, CheckpointState]:
    """``(model, config, state)`` from a checkpoint written by the Trainer: the model is rebuilt
    from the model spec (a model passed in by hand) or the config stored in the checkpoint,
    its weights loaded (eval mode) and moved to
    ``device``. ``state`` is the typed :class:`CheckpointState` (classes, preprocessing, step)."""
    return rebuild_model(load_checkpoint(path), path, device=device)


def rebuild_model(ck: dict, path: str | Path, *, device: str | torch.device = "cpu"
                  ) -> tuple[nn.Module, ExperimentConfig, CheckpointState]:
    """:func:`load_trained_model` from an already loaded checkpoint (``load_checkpoint(path)``),
    for callers that also need its other parts (e.g. the objective's weights) without reading
    and verifying the file twice."""
    from ..models import load_matching_state_dict
    from .build import build_model

    st = CheckpointState.from_dict(ck["state"])
    cfg = config_from_dict(st.config)
    cfg.model.init = None  # the weights come from the checkpoint, not from what it was initialised with
    if cfg.moe and cfg.moe.get("expert_parallel", 1) != 1:  # the model comes back whole, on this process
        cfg.moe["expert_parallel"] = 1
    if st.model_spec:  # a model built by hand (a recipe's encoder, MoCE, a deployed dense ViT)
        spec = st.model_spec
        if (spec.get("moe") or {}).get("expert_parallel", 1) != 1:
            spec = {**spec, "moe": {**spec["moe"], "expert_parallel": 1}}
        model = build_from_spec(spec)
    else:
        model = build_model(cfg, num_classes=st.num_classes, in_chans=st.in_chans)
    bad = first_nonfinite(ck["model"])
    if bad is not None:
        raise ValueError(f"checkpoint {path} holds NaN/Inf weights (first: {bad}); it cannot predict anything: use "
                         "an earlier checkpoint of the run")
    load_matching_state_dict(model, ck["model"], f"checkpoint {path}")
    return model.eval().to(device), cfg, st
