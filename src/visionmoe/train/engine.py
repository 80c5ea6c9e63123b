"""The training engine: one ``Trainer`` for every objective, MoE-aware, exactly resumable.

Axis legend: B images in a batch, C channels, H/W image size.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from ..data import TensorSplits, adapt, build_train_transform, load_dataset
from ..models import count_parameters, create_model
from ..moe.layer import collect_aux_loss, collect_routing_stats
from ..moe.parallel import (
    TRAFFIC,
    gather_expert_state,
    gather_optimizer_state,
    reduce_gradients,
    shard_expert_state,
    shard_experts,
    shard_optimizer_state,
    sharded_parameters,
)
from ..objectives import ClassificationObjective, MAEObjective, MoCoObjective, SegmentationObjective
from .checkpoint import ForeignCheckpointError, load_checkpoint, save_checkpoint, set_rng_state, verify_checkpoint
from .config import ExperimentConfig, config_from_dict, config_to_dict
from .distributed import all_reduce_sums, barrier, init_distributed
from .monitor import RoutingMonitor

__all__ = ["Trainer", "TrainingDiverged", "build_model", "build_optimizer", "cosine_lr", "seed_everything",
           "load_trained_model"]


class TrainingDiverged(RuntimeError):
    """Too many steps had a NaN/Inf loss or gradient (``run.max_skipped_steps``)."""


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


def build_model(cfg: ExperimentConfig, *, num_classes: int, in_chans: int) -> nn.Module:
    """The model an experiment describes: variant + args + MoE overrides (or dense)."""
    args = {"num_classes": num_classes, "in_chans": in_chans, **cfg.model.args}
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
        load_dense_into_moe(model, sd, noise=cfg.model.init_noise, seed=cfg.run.seed, skip=tuple(cfg.model.init_skip))
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


class Trainer:
    """Train and evaluate a model described by an :class:`ExperimentConfig`.

    Args:
        cfg: the experiment.
        run_dir: where logs, config and checkpoints go (default ``run.out_dir/run.name``).
        data: pre-loaded data (default: ``load_dataset(cfg.data.name, **cfg.data.args)``).
        model: a pre-built model (default: :func:`build_model`).
        objective: a pre-built objective (default: from ``cfg.objective``), e.g. MoCE's.
    """

    def __init__(
        self,
        cfg: ExperimentConfig | dict,
        *,
        run_dir: str | Path | None = None,
        data: TensorSplits | None = None,
        model: nn.Module | None = None,
        objective: nn.Module | None = None,
    ) -> None:
        self.cfg = cfg if isinstance(cfg, ExperimentConfig) else config_from_dict(cfg)
        c = self.cfg
        if c.run.threads:
            torch.set_num_threads(c.run.threads)
        seed_everything(c.run.seed, c.run.deterministic)
        self.dist = init_distributed()
        if c.data.batch_size % self.dist.world:
            raise ValueError(f"data.batch_size={c.data.batch_size} (the global batch) must be divisible by the "
                             f"number of processes ({self.dist.world})")
        self.data = data if data is not None else load_dataset(c.data.name, **c.data.args)
        if len(self.data.x_train) == 0:
            raise ValueError(f"data set {self.data.name!r} has no training images")
        self.channels = c.data.channels or self.data.x_train.shape[1]
        self.model = model if model is not None else build_model(
            c, num_classes=self.data.num_classes, in_chans=self.channels)
        self.expert_parallel = int((c.moe or {}).get("expert_parallel", 1) or 1) if not c.model.dense else 1
        if self.expert_parallel > 1:  # before the objective, EMA and optimizer copy or see the experts
            if not self.dist.enabled:
                raise ValueError(f"moe.expert_parallel={self.expert_parallel} needs {self.expert_parallel} processes: "
                                 f"torchrun --nproc_per_node={self.expert_parallel} -m visionmoe train ...; to run "
                                 "in one process (a checkpoint loads in any layout) set moe.expert_parallel=1")
            if shard_experts(self.model, self.expert_parallel) == 0:
                raise ValueError(f"moe.expert_parallel={self.expert_parallel} but the model has no MoE layers")
        pe = getattr(self.model, "patch_embed", None)
        default_size = pe.img_size[0] if pe is not None and getattr(pe, "img_size", None) else None
        self.img_size = c.data.img_size or default_size or self.data.x_train.shape[-1]
        self.steps_per_epoch = max(1, len(self.data.x_train) // c.data.batch_size)
        self.total_steps = c.schedule.max_steps or max(1, math.ceil(c.schedule.epochs * self.steps_per_epoch))
        self.warmup_steps = min(round(c.schedule.warmup_epochs * self.steps_per_epoch), self.total_steps // 2)
        if objective is not None:
            self.objective = objective
        elif c.objective == "mae":
            self.objective = MAEObjective(self.model, **c.objective_args)
        elif c.objective == "moco":
            self.objective = MoCoObjective(self.model, **{"total_steps": self.total_steps, **c.objective_args})
        elif c.objective == "segmentation":
            self.objective = SegmentationObjective(self.model, self.data.num_classes, **c.objective_args)
        else:
            self.objective = ClassificationObjective(self.data.num_classes, label_smoothing=c.run.label_smoothing,
                                                     mixup=c.run.mixup, cutmix=c.run.cutmix, **c.objective_args)
        self.optimizer = build_optimizer(self.model, c.optim,
                                         self.objective if isinstance(self.objective, nn.Module) else None)
        self.ema = None
        if c.run.ema_decay:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=c.run.ema_decay)
        self.train_model = torch.compile(self.model) if c.run.compile else self.model
        self.transform = build_train_transform(c.data.augment, self.img_size)
        self.step = 0
        self.skipped_steps = 0  # steps whose loss or gradient was not finite (not applied)
        self.monitor = RoutingMonitor(c.run.collapse_share, c.run.collapse_steps, c.run.dead_expert_steps)
        self.run_dir = Path(run_dir) if run_dir else Path(c.run.out_dir) / (
            c.run.name or f"{c.model.name}-{self.data.name}-{datetime.now():%Y%m%d-%H%M%S}")
        self._x_train = adapt(self.data.x_train, channels=self.channels, size=self.img_size)
        self._x_test = adapt(self.data.x_test, channels=self.channels, size=self.img_size)

    # ---------------------------------------------------------------- pieces
    def lr_at(self, step: int) -> float:
        s = self.cfg.schedule
        return cosine_lr(step, base=self.cfg.optim.lr, total=self.total_steps, warmup=self.warmup_steps,
                         min_lr=s.min_lr)

    def batch(self, step: int) -> tuple[Tensor, ...]:
        """The training batch of a given step, ``(x, y)`` or ``(x, y, routing_key)``: a fixed
        permutation per epoch (seed, epoch)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.cfg.run.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self._x_train), generator=g)
        bs = self.cfg.data.batch_size
        idx = order[i * bs : (i + 1) * bs][self.dist.rank :: self.dist.world]  # this rank's share
        x = self._x_train[idx]
        if self.transform is not None:
            x = torch.stack([self.transform(img) for img in x])
        if self.data.keys_train is not None:
            return x, self.data.y_train[idx], self.data.keys_train[idx]
        return x, self.data.y_train[idx]

    def _autocast(self):
        if self.cfg.run.amp == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def routing_stats(self, model: nn.Module | None = None) -> dict[str, dict]:
        model = model or self.model
        fn = getattr(model, "routing_stats", None)
        return fn() if callable(fn) else collect_routing_stats(model)

    def aux_loss(self) -> Tensor:
        fn = getattr(self.model, "moe_aux_loss", None)
        return fn() if callable(fn) else collect_aux_loss(self.model)

    def train_step(self, batch: tuple[Tensor, Tensor]) -> dict[str, float]:
        self.train_model.train()
        lr = self.lr_at(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        if isinstance(self.objective, nn.Module):
            self.objective.train()
        with self._autocast():
            out = self.objective(self.train_model, batch)
            aux = self.aux_loss()
        loss = out["loss"] + aux
        self.optimizer.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(loss.detach()))
        if self.dist.enabled:  # every rank skips if any rank's loss is not finite
            finite = all_reduce_sums({"bad": float(not finite)}, self.dist)["bad"] == 0
        grad_norm = None
        if finite:
            loss.backward()
            self._average_gradients()
            grad_norm = float(self._grad_norm())
            finite = math.isfinite(grad_norm)
        metrics = {"loss": float(out["loss"].detach()), "aux_loss": float(aux.detach()), "lr": lr}
        metrics.update({k: float(v) for k, v in out.items() if k != "loss"})
        if not finite:  # skip: no update, no EMA; the schedule and the data order go on
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self.step += 1
            metrics["skipped"] = 1.0
            if self.skipped_steps > self.cfg.run.max_skipped_steps:
                raise TrainingDiverged(
                    f"step {self.step}: the loss or gradient was NaN/Inf in {self.skipped_steps} steps "
                    f"(run.max_skipped_steps={self.cfg.run.max_skipped_steps}); stopping. Lower optim.lr, set "
                    "optim.clip_grad, or use run.amp=none; the last good checkpoint is in " + str(self.checkpoint_dir))
            return metrics
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        self.step += 1
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm
        return metrics

    def _trainable(self) -> list[Tensor]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if isinstance(self.objective, nn.Module):
            params += [p for p in self.objective.parameters() if p.requires_grad]
        return params

    def _average_gradients(self) -> None:
        """Data parallelism: average the gradients over the ranks with one all-reduce of a
        flat buffer (DistributedDataParallel's arithmetic). Done explicitly rather than with
        the DDP wrapper because objectives call several model methods and several forwards
        per step (MAE's ``forward_visible``, MoCo's two views), which DDP's reducer does not
        support. A parameter without a gradient on some rank contributes zeros; one without a
        gradient on every rank (an unused head) keeps ``grad=None``, so the optimizer skips it
        as it would in one process."""
        if not self.dist.enabled:
            return
        reduce_gradients(self._trainable(), self._sharded(), self.dist.world)

    def _sharded(self) -> dict:
        """Expert shards (parameter id -> shard) of the model and the objective."""
        if self.expert_parallel == 1:
            return {}
        out = sharded_parameters(self.model)
        if isinstance(self.objective, nn.Module):
            out |= sharded_parameters(self.objective)
        return out

    def _grad_norm(self) -> Tensor:
        """Total gradient norm, clipped to ``optim.clip_grad`` when set."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.expert_parallel > 1:
            return self._sharded_grad_norm(params)
        if self.cfg.optim.clip_grad:
            return torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.clip_grad)
        if not params:
            return torch.zeros(())
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))

    def _sharded_grad_norm(self, params: list[Tensor]) -> Tensor:
        """:meth:`_grad_norm` with expert parallelism: the expert shards' squares are summed
        over the expert-parallel group, so every rank clips by the norm of the whole model."""
        import torch.distributed as dist

        sharded = self._sharded()
        sq = [torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)]
        for p in params:
            sq[id(p) in sharded] += torch.linalg.vector_norm(p.grad).double() ** 2
        group = next(iter(sharded.values())).group
        dist.all_reduce(sq[1], group=group)
        total = (sq[0] + sq[1]).sqrt().float()
        clip = self.cfg.optim.clip_grad
        if clip:
            coef = torch.clamp(clip / (total + 1e-6), max=1.0)
            for p in params:
                p.grad.mul_(coef)
        return total

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> dict[str, Any]:
        """The objective's test metrics (``eval_batch`` sums averaged over the test set:
        accuracy and loss, masked reconstruction loss with fixed masks, ...) and routing
        statistics over the whole test set."""
        model = model or (self.ema.module if self.ema is not None else self.model)
        model.eval()
        if isinstance(self.objective, nn.Module):
            self.objective.eval()
        bs = self.cfg.data.eval_batch_size
        sums: dict[str, float] = {}
        n = 0
        loads: dict[str, list] = {}
        gen = torch.Generator().manual_seed(1234)  # the same masks / views at every evaluation
        share = -(-len(self._x_test) // self.dist.world)  # each rank evaluates one contiguous share
        lo, hi = self.dist.rank * share, min(len(self._x_test), (self.dist.rank + 1) * share)
        if self.dist.enabled and hi <= lo:
            raise ValueError(f"{len(self._x_test)} test images cannot be shared by {self.dist.world} processes")
        starts = list(range(lo, hi, bs))
        if self.expert_parallel > 1:  # every rank must run as many forwards (the all-to-all is collective)
            n_batches = -(-share // bs)
            j = min(lo + bs, hi)
            for _ in range(n_batches - len(starts)):  # extra passes over its first batch, not counted
                x, y = self._x_test[lo:j], self.data.y_test[lo:j]
                key = self.data.keys_test[lo:j] if self.data.keys_test is not None else None
                with self._autocast():
                    self.objective.eval_batch(model, x, y, key, torch.Generator().manual_seed(0))
        for i in starts:
            j = min(i + bs, hi)
            x, y = self._x_test[i:j], self.data.y_test[i:j]
            key = self.data.keys_test[i:j] if self.data.keys_test is not None else None
            with self._autocast():
                for k, v in self.objective.eval_batch(model, x, y, key, gen).items():
                    sums[k] = sums.get(k, 0.0) + v
            n += len(y)
            for name, s in self.routing_stats(model).items():
                loads.setdefault(name, []).append((len(y), s))
        flat = {f"m|{k}": v for k, v in sums.items()} | {"n": float(n)}
        for name, items in loads.items():  # image-weighted sums, reduced over the ranks below
            flat[f"r|{name}|w"] = sum(w for w, _ in items)
            for key in ("dropped_fraction", "gate_entropy"):
                flat[f"r|{name}|{key}"] = sum(w * s[key] for w, s in items)
            for e in range(len(items[0][1]["load"])):
                flat[f"r|{name}|load|{e}"] = sum(w * s["load"][e] for w, s in items)
        flat = all_reduce_sums(flat, self.dist)
        n = int(flat["n"])
        sums = {k[2:]: v for k, v in flat.items() if k.startswith("m|")}
        routing: dict[str, dict] = {}
        for name in loads:
            total = flat[f"r|{name}|w"]
            routing[name] = {key: flat[f"r|{name}|{key}"] / total for key in ("dropped_fraction", "gate_entropy")}
            num = sum(1 for k in flat if k.startswith(f"r|{name}|load|"))
            routing[name]["load"] = [round(flat[f"r|{name}|load|{e}"] / total, 4) for e in range(num)]
        out = {f"test_{k}": v / max(n, 1) for k, v in sums.items()}
        summarize = getattr(self.objective, "summarize", None)
        if callable(summarize):
            out = summarize(out)
        return out | {"routing": routing}

    # ---------------------------------------------------------------- checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def save(self) -> Path:
        """Write a checkpoint (rank 0; the other ranks wait for it)."""
        path = self.checkpoint_dir / f"step_{self.step:08d}.safetensors"
        model_sd, optim_sd, ema_sd, obj = self._full_states()  # collective with expert parallelism
        if not self.dist.is_main:
            barrier(self.dist)
            return path
        state = {"step": self.step, "skipped_steps": self.skipped_steps, "config": config_to_dict(self.cfg),
                 "num_classes": self.data.num_classes,
                 "in_chans": self.channels, "img_size": self.img_size, "classes": list(self.data.classes)}
        save_checkpoint(path, model=model_sd, optimizer=optim_sd, ema=ema_sd, objective=obj, state=state)
        ckpts = sorted(self.checkpoint_dir.glob("step_*.safetensors"))
        for old in ckpts[: max(0, len(ckpts) - self.cfg.run.keep_checkpoints)]:
            old.unlink()
        barrier(self.dist)
        return path

    def _full_states(self) -> tuple[dict, dict, dict | None, dict | None]:
        """Model, optimizer, EMA and objective state in the layout-independent form: expert shards
        gathered to full ``(E, ...)`` tensors (every rank takes part) when experts are split."""
        model_sd, optim_sd = self.model.state_dict(), self.optimizer.state_dict()
        ema_sd = self.ema.module.state_dict() if self.ema is not None else None
        obj = self.objective.state_dict() if isinstance(self.objective, nn.Module) else None
        if self.expert_parallel > 1:
            model_sd = gather_expert_state(self.model, model_sd)
            optim_sd = gather_optimizer_state(self.optimizer, self.model, optim_sd)
            if ema_sd is not None:
                ema_sd = gather_expert_state(self.ema.module, ema_sd)
            if obj is not None:
                obj = gather_expert_state(self.objective, obj)
        return model_sd, optim_sd, ema_sd, obj

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint that verifies. Damaged newer ones (a truncated or tampered
        file) are renamed ``*.corrupt`` (kept for inspection) with a warning."""
        for path in sorted(self.checkpoint_dir.glob("step_*.safetensors"), reverse=True):
            problem = verify_checkpoint(path)
            if problem is None:
                return path
            if not self.dist.is_main:
                continue
            bad = path.with_name(path.name + ".corrupt")
            path.rename(bad)
            warnings.warn(f"{problem}; moved it to {bad.name} and looking for an older checkpoint", stacklevel=2)
        return None

    def load(self, path: str | Path) -> None:
        from ..models import load_matching_state_dict

        ck = load_checkpoint(path)  # full expert tensors; each rank keeps the rows of its experts
        load_matching_state_dict(self.model, shard_expert_state(self.model, ck["model"]), f"checkpoint {path}")
        if ck["optimizer"] is not None:
            self.optimizer.load_state_dict(shard_optimizer_state(self.optimizer, self.model, ck["optimizer"]))
        if isinstance(self.objective, nn.Module) and ck["objective"] is not None:
            self.objective.load_state_dict(shard_expert_state(self.objective, ck["objective"]))
        if self.ema is not None and ck["ema"] is not None:
            self.ema.module.load_state_dict(shard_expert_state(self.ema.module, ck["ema"]))
        if ck["rng"] is not None:
            set_rng_state(*ck["rng"])
        self.step = int(ck["state"]["step"])
        self.skipped_steps = int(ck["state"].get("skipped_steps", 0))

    # ---------------------------------------------------------------- loop
    def _log(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _truncate_log(self) -> None:
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            keep = []
            for ln in path.read_text().splitlines():
                try:
                    rec = json.loads(ln)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if rec.get("step", 0) <= self.step:
                    keep.append(ln)
            path.write_text("".join(ln + "\n" for ln in keep))

    def fit(self, *, resume: bool | str | Path = False, stop_after: int | None = None,
            on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
        """Train to ``total_steps`` (or stop early after ``stop_after`` steps, e.g. to test
        resumption); ``resume=True`` continues from the run's latest checkpoint; ``on_step(step,
        metrics)`` is called after every step (e.g. to drive an outer progress bar)."""
        c = self.cfg
        main = self.dist.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(c), sort_keys=False))
            for stale in self.checkpoint_dir.glob(".step_*.tmp"):  # left by a kill during a save
                stale.unlink(missing_ok=True)
        if resume:
            path = self.latest_checkpoint() if resume is True else Path(resume)
            if path is None:
                raise FileNotFoundError(f"nothing to resume: no checkpoint in {self.checkpoint_dir}")
            self.load(path)
            if main:
                self._truncate_log()
        elif main and (self.run_dir / "metrics.jsonl").exists():
            (self.run_dir / "metrics.jsonl").unlink()
        barrier(self.dist)
        tb = None
        if c.run.tensorboard and main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:
                print("tensorboard is not installed; logging to metrics.jsonl only")
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        cols = [TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
        eval_every = max(1, round(c.run.eval_every_epochs * self.steps_per_epoch))
        end = self.total_steps if stop_after is None else min(self.total_steps, self.step + stop_after)
        t0, seen, start_step, a2a_bytes = time.perf_counter(), 0, self.step, 0
        last_eval: dict[str, Any] = {}
        with Progress(*cols, disable=not (c.run.progress and main)) as bar:
            task = bar.add_task("train", total=self.total_steps, completed=self.step, info="")
            while self.step < end:
                batch = self.batch(self.step)
                sent = TRAFFIC["bytes"]
                m = self.train_step(batch)
                a2a_bytes += TRAFFIC["bytes"] - sent
                seen += len(batch[0]) * self.dist.world  # images of the global batch
                ips = seen / (time.perf_counter() - t0)
                acc = f" acc {m['acc']:.2f}" if "acc" in m else ""
                bar.update(task, advance=1, info=f"loss {m['loss']:.3f}{acc} {ips:.0f} img/s")
                if on_step is not None:
                    on_step(self.step, m)
                if m.get("skipped"):
                    bar.console.print(f"step {self.step}: NaN/Inf loss or gradient, update skipped "
                                      f"({self.skipped_steps} of at most {c.run.max_skipped_steps})")
                    self._log({"step": self.step, "skipped_step": True, "skipped_steps": self.skipped_steps})
                for msg in self.monitor.update(self.model, self.step) if main else []:
                    warnings.warn(msg, RuntimeWarning, stacklevel=2)
                    bar.console.print(f"[yellow]warning:[/] {msg}")
                    self._log({"step": self.step, "warning": msg})
                if self.step % c.run.log_every == 0 or self.step == self.total_steps:
                    if self.dist.enabled:  # the mean over the ranks
                        m = {k: v / self.dist.world for k, v in all_reduce_sums(m, self.dist).items()}
                    rec = {"step": self.step, "epoch": self.step / self.steps_per_epoch, **m, "img_per_s": ips,
                           "elapsed_s": round(time.perf_counter() - t0, 2),
                           "routing": self.routing_stats()}
                    self._log(rec)
                    if tb is not None:
                        for k, v in m.items():
                            tb.add_scalar(f"train/{k}", v, self.step)
                if self.step % eval_every == 0 or self.step == self.total_steps:
                    last_eval = self.evaluate()
                    self._log({"step": self.step, "epoch": self.step / self.steps_per_epoch,
                               "elapsed_s": round(time.perf_counter() - t0, 2), **last_eval})
                    headline = next((k for k in last_eval if k != "routing"), None)
                    if headline is not None and main and c.run.print_eval:  # None: no test images
                        bar.console.print(f"step {self.step}: {headline} {last_eval[headline]:.4f}")
                    if tb is not None and headline is not None:
                        tb.add_scalar(f"test/{headline}", last_eval[headline], self.step)
                if self.step % c.run.checkpoint_every == 0 or self.step == end:
                    self.save()
        if not last_eval:  # nothing ran (e.g. resuming a finished run) or no evaluation was due
            last_eval = self.evaluate()
        elapsed = time.perf_counter() - t0
        summary = {"run_dir": str(self.run_dir), "step": self.step, "total_steps": self.total_steps,
                   "finished": self.step >= self.total_steps, "train_seconds": elapsed,
                   "train_img_per_s": seen / elapsed if elapsed > 0 else 0.0,
                   "steps_this_session": self.step - start_step, "skipped_steps": self.skipped_steps,
                   "params": count_parameters(self.model), **last_eval}
        if self.expert_parallel > 1:  # bytes this rank sent to other ranks' experts (and gradients back)
            summary["all_to_all_mb_per_step"] = a2a_bytes / max(1, self.step - start_step) / 1e6
        if main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            self._write_csv()
        if tb is not None:
            tb.close()
        return summary

    def _write_csv(self) -> None:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        rows = [json.loads(ln) for ln in path.read_text().splitlines()]
        keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float))})
        lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in rows]
        (self.run_dir / "metrics.csv").write_text("\n".join(lines) + "\n")


def load_trained_model(path: str | Path) -> tuple[nn.Module, ExperimentConfig, dict[str, Any]]:
    """``(model, config, state)`` from a checkpoint written by :class:`Trainer`: the model is
    rebuilt from the config stored in the checkpoint and its weights loaded (eval mode).
    ``state`` has ``num_classes``, ``in_chans``, ``img_size``, ``classes`` and ``step``."""
    from ..models import load_matching_state_dict

    ck = load_checkpoint(path)
    st = ck["state"]
    cfg = config_from_dict(st["config"])
    cfg.model.init = None  # the weights come from the checkpoint, not from what it was initialised with
    if cfg.moe and cfg.moe.get("expert_parallel", 1) != 1:  # the model comes back whole, on this process
        cfg.moe["expert_parallel"] = 1
    model = build_model(cfg, num_classes=st["num_classes"], in_chans=st["in_chans"])
    load_matching_state_dict(model, ck["model"], f"checkpoint {path}")
    return model.eval(), cfg, st
