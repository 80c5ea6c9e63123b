"""The training loop: one ``Trainer`` for every objective, MoE-aware, on any device, exactly
resumable (with any number of loader workers).

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

from .._utils import atomic_write_bytes
from ..data import TensorSplits, load_dataset
from ..data.preprocess import Preprocessing, resolve_normalization
from ..data.streaming import (
    StepBatchSampler,
    collate,
    default_workers,
    eval_batches,
    eval_set,
    native_shape,
    train_loader,
    training_set,
)
from ..models import count_parameters
from ..moe.layer import collect_aux_loss, compile_settings, moe_layers
from ..moe.parallel import sent_bytes, shard_experts
from ..moe.placement import probed_layers
from ..moe.routers import update_balance_biases
from ..objectives import create_objective
from ..runtime import ThreadGovernor
from .build import RunExistsError, TrainingDiverged, build_model, build_optimizer, cosine_lr, seed_everything
from .checkpoint import verify_checkpoint
from .config import ExperimentConfig, config_from_dict, config_to_dict
from .context import RunContext
from .distributed import all_reduce_sums, barrier
from .evaluation import evaluate, routing_stats
from .lock import RunLock
from .logs import MetricsLog
from .monitor import RoutingMonitor
from .persist import gradient_step_norm, load_state, save_state
from .state import model_spec

__all__ = ["Trainer"]


class Trainer:
    """Train and evaluate a model described by an :class:`ExperimentConfig`.

    Args:
        cfg: the experiment.
        run_dir: where logs, config and checkpoints go (default ``run.out_dir/run.name``).
        data: pre-loaded data, in memory (:class:`~visionmoe.data.TensorSplits`) or a folder index
            (:class:`~visionmoe.data.FolderData`); default ``load_dataset(cfg.data.name, **cfg.data.args)``.
        model: a pre-built model (default: :func:`build_model`).
        objective: a pre-built objective (an ``nn.Module``; default: the registered ``cfg.objective``).
    """

    def __init__(self, cfg: ExperimentConfig | dict, *, run_dir: str | Path | None = None, data: Any = None,
                 model: nn.Module | None = None, objective: nn.Module | None = None) -> None:
        self.cfg = cfg if isinstance(cfg, ExperimentConfig) else config_from_dict(cfg)
        c = self.cfg
        if isinstance(c.run.threads, int):
            torch.set_num_threads(c.run.threads)
        seed_everything(c.run.seed, c.run.deterministic)
        self.ctx = RunContext.create(device=c.run.device, amp=c.run.amp, tf32=c.run.tf32)
        if c.data.batch_size % self.dist.world:
            raise ValueError(f"data.batch_size={c.data.batch_size} (the global batch) must be divisible by the "
                             f"number of processes ({self.dist.world})")
        self.data = data if data is not None else load_dataset(c.data.name, **c.data.args)
        native_channels, native_size = native_shape(self.data)
        self.channels = c.data.channels or native_channels
        self.placement_scores, self.placement_note = None, ""
        if model is None and not c.model.dense and probed_layers((c.moe or {}).get("placement")) is not None:
            self.placement_scores = self._probe_placement(native_size)  # resolves moe.placement to block indices
        self.model = model if model is not None else build_model(
            c, num_classes=self.data.num_classes, in_chans=self.channels)
        # a model passed in by hand is described in its checkpoints, so any command can rebuild it
        self.model_spec = model_spec(self.model) if model is not None else None
        self.expert_parallel = int((c.moe or {}).get("expert_parallel", 1) or 1) if not c.model.dense else 1
        if self.expert_parallel > 1:  # before the objective, EMA and optimizer copy or see the experts
            if not self.dist.enabled:
                raise ValueError(f"moe.expert_parallel={self.expert_parallel} needs {self.expert_parallel} processes: "
                                 f"torchrun --nproc_per_node={self.expert_parallel} -m visionmoe train ...; to run "
                                 "in one process (a checkpoint loads in any layout) set moe.expert_parallel=1")
            if shard_experts(self.model, self.expert_parallel) == 0:
                raise ValueError(f"moe.expert_parallel={self.expert_parallel} but the model has no MoE layers")
        self.preprocessing = self._preprocessing(self.model, native_size)
        self.img_size = self.preprocessing.size
        self.train_set = training_set(self.data, self.preprocessing, seed=c.run.seed, augment=c.data.augment,
                                      auto_augment=c.data.auto_augment, reprob=c.data.reprob)
        self.eval_set = eval_set(self.data, self.preprocessing)
        if len(self.train_set) == 0:
            raise ValueError(f"data set {self.data.name!r} has no training images")
        if len(self.train_set) < c.data.batch_size:
            raise ValueError(f"data.batch_size={c.data.batch_size} is larger than the {len(self.train_set)} training "
                             "images; lower data.batch_size")
        self.workers = c.data.workers if c.data.workers is not None else default_workers(self.data)
        self.steps_per_epoch = max(1, len(self.train_set) // c.data.batch_size)
        self.total_steps = c.schedule.max_steps or max(1, math.ceil(c.schedule.epochs * self.steps_per_epoch))
        self.warmup_steps = min(round(c.schedule.warmup_epochs * self.steps_per_epoch), self.total_steps // 2)
        if objective is None:
            objective = create_objective(c.objective, self.model, num_classes=self.data.num_classes,
                                         total_steps=self.total_steps, run=c.run, args=c.objective_args)
        if not isinstance(objective, nn.Module):
            raise TypeError(f"an objective must be an nn.Module (visionmoe.objectives.Objective), got "
                            f"{type(objective).__name__}")
        dev = self.ctx.device
        self.model.to(dev)
        self.objective = objective.to(dev)
        self.optimizer = build_optimizer(self.model, c.optim, self.objective)
        self.ema = None
        if c.run.ema_decay:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=c.run.ema_decay)
        self.train_model = torch.compile(self.model) if c.run.compile else self.model
        # compiled MoE layers trace in one graph under these dynamo settings (not graph breaks)
        self._compiling = (compile_settings if c.run.compile and any(True for _ in moe_layers(self.model))
                           else contextlib.nullcontext)
        self.step = 0
        self.skipped_steps = 0  # steps whose loss or gradient was not finite (not applied)
        self.monitor = RoutingMonitor(c.run.collapse_share, c.run.collapse_steps, c.run.dead_expert_steps)
        self.run_dir = Path(run_dir) if run_dir else Path(c.run.out_dir) / (
            c.run.name or f"{c.model.name}-{self.data.name}-{datetime.now():%Y%m%d-%H%M%S}")
        self.log = MetricsLog(self.run_dir, enabled=self.dist.is_main, tensorboard=c.run.tensorboard)
        self._eval_loader = None  # built on first use, its workers kept for later evaluations

    def _preprocessing(self, model: nn.Module, native_size: int | None) -> Preprocessing:
        """The one preprocessing of this run: ``data.img_size``, else the model's input size,
        else the data's own; channels, resize, crop and the normalisation ``data.normalize``
        resolves for ``model``."""
        c = self.cfg
        pe = getattr(model, "patch_embed", None)
        default_size = pe.img_size[0] if pe is not None and getattr(pe, "img_size", None) else None
        size = c.data.img_size or default_size or native_size
        if size is None:
            raise ValueError("the model has no input size and the data set none of its own; set data.img_size")
        mean, std = resolve_normalization(c.data.normalize, self.channels, model)
        return Preprocessing(size, self.channels, resize=c.data.resize, crop_pct=c.data.crop_pct, mean=mean, std=std)

    def _probe_placement(self, native_size: int | None) -> list[float]:
        """``placement: by_gradient_magnitude[_n]`` (MoCE's rule): the gradient magnitude of
        every block's MLP under this run's objective, on the first 4 batches (no augmentation)
        of a dense twin of the model as this seed initialises it; ``moe.placement`` becomes the
        ``n`` (default 2) blocks with the largest, so checkpoints rebuild without probing."""
        import copy

        from ..analysis.gradients import gradient_magnitude_scores
        from ..data.streaming import collate
        from ..moe.placement import resolve_placement

        c = self.cfg
        twin_cfg = copy.deepcopy(c)
        twin_cfg.model.dense = True
        seed_everything(c.run.seed, c.run.deterministic)
        dense = build_model(twin_cfg, num_classes=self.data.num_classes, in_chans=self.channels)
        ds = training_set(self.data, self._preprocessing(dense, native_size), seed=c.run.seed)
        bs = c.data.batch_size
        n_batches = max(1, min(4, len(ds) // bs))
        batches = [collate(ds.__getitems__(list(range(i * bs, min(len(ds), (i + 1) * bs))))) for i in range(n_batches)]
        objective = create_objective(c.objective, dense, num_classes=self.data.num_classes, total_steps=1, run=c.run,
                                     args=c.objective_args)
        scores = gradient_magnitude_scores(dense, batches, lambda m, b: objective(m, b)["loss"])
        policy = c.moe["placement"]
        c.moe["placement"] = resolve_placement(policy, len(scores), scores=scores)
        self.placement_note = (f"; placement {policy}: MLP gradient magnitudes "
                               f"{[round(v, 4) for v in scores]} -> blocks {c.moe['placement']}")
        seed_everything(c.run.seed, c.run.deterministic)  # the MoE model starts as it would without the probe
        return scores

    # ---------------------------------------------------------------- pieces
    @property
    def dist(self):
        return self.ctx.dist

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    def describe(self) -> str:
        """One line: what was loaded, how it is prepared, where the run computes."""
        kind = "streamed" if not isinstance(self.data, TensorSplits) else "in memory"
        return (f"data {self.data.name!r} ({kind}): {len(self.train_set):,} train / {len(self.eval_set):,} test "
                f"images, {self.data.num_classes} classes; {self.preprocessing.describe()}; augment "
                f"{self.cfg.data.augment}; {self.workers} loader worker(s); {self.ctx.describe()}"
                + ("; no checkpoints (run.keep_checkpoints=0): this run cannot be resumed or evaluated later"
                   if not self.cfg.run.keep_checkpoints else "") + self.placement_note)

    def lr_at(self, step: int) -> float:
        s = self.cfg.schedule
        return cosine_lr(step, base=self.cfg.optim.lr, total=self.total_steps, warmup=self.warmup_steps,
                         min_lr=s.min_lr)

    def sampler(self, start: int, stop: int) -> StepBatchSampler:
        return StepBatchSampler(len(self.train_set), self.cfg.data.batch_size, seed=self.cfg.run.seed, start=start,
                                stop=stop, rank=self.dist.rank, world=self.dist.world)

    def batch(self, step: int) -> tuple[Tensor, ...]:
        """The training batch of a given step on the run's device, ``(x, y)`` or ``(x, y,
        routing_key)``: what the loader yields for that step."""
        keys = self.sampler(step, step + 1).indices(step)
        return self.ctx.to_device(collate(self.train_set.__getitems__(keys)))

    def test_inputs(self, n: int | None = None) -> Tensor:
        """The first ``n`` test images as model inputs (preprocessed), on the run's device."""
        n = len(self.eval_set) if n is None else min(n, len(self.eval_set))
        return self.ctx.to_device(collate(self.eval_set.__getitems__(list(range(n)))))[0]

    def routing_stats(self, model: nn.Module | None = None) -> dict[str, dict]:
        return routing_stats(model or self.model)

    def aux_loss(self) -> Tensor:
        fn = getattr(self.model, "moe_aux_loss", None)
        return fn() if callable(fn) else collect_aux_loss(self.model)

    def train_step(self, batch: tuple[Tensor, ...]) -> dict[str, float]:
        self.train_model.train()
        self.objective.train()
        lr = self.lr_at(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        with self.ctx.autocast(), self._compiling():
            out = self.objective(self.train_model, batch)
            aux = self.aux_loss()
        loss = out["loss"] + aux
        self.optimizer.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(loss.detach()))
        if self.dist.enabled:  # every rank skips if any rank's loss is not finite
            finite = all_reduce_sums({"bad": float(not finite)}, self.dist)["bad"] == 0
        grad_norm = None
        scaler = self.ctx.scaler
        if finite:
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if scaler is not None:
                scaler.unscale_(self.optimizer)
            grad_norm = gradient_step_norm(self)
            finite = math.isfinite(grad_norm)
        metrics = {"loss": float(out["loss"].detach()), "aux_loss": float(aux.detach()), "lr": lr}
        metrics.update({k: float(v) for k, v in out.items() if k != "loss"})
        if not finite:  # skip: no update, no EMA; the schedule and the data order go on
            if scaler is not None and grad_norm is not None:
                scaler.update()  # fp16 overflow: lower the scale (the scaler's own skip)
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
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        update_balance_biases(self.model)  # loss-free balancing: each router's selection bias, after the step
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        self.step += 1
        metrics["grad_norm"] = grad_norm
        return metrics

    def evaluate(self, model: nn.Module | None = None) -> dict[str, Any]:
        """:func:`~visionmoe.train.evaluation.evaluate` of ``model`` (default the EMA model, else
        the model) on the test set."""
        model = model or (self.ema.module if self.ema is not None else self.model)
        if self._eval_loader is None:
            self._eval_loader = eval_batches(self.eval_set, self.cfg.data.eval_batch_size, rank=self.dist.rank,
                                             world=self.dist.world, workers=self.workers,
                                             pin_memory=self.ctx.pin_memory, persistent=True)
        return evaluate(model, self.objective, self.eval_set, self.ctx, batch_size=self.cfg.data.eval_batch_size,
                        expert_parallel=self.expert_parallel, loader=self._eval_loader)

    # ---------------------------------------------------------------- checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def save(self) -> Path:
        """Write a checkpoint (rank 0; the other ranks wait for it)."""
        return save_state(self)

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
        load_state(self, path)

    # ---------------------------------------------------------------- loop
    def _start(self, resume: bool | str | Path, overwrite: bool = False, allow_changes: tuple[str, ...] = ()) -> None:
        main = self.dist.is_main
        existing = sorted(self.checkpoint_dir.glob("step_*.safetensors"))
        if existing and not resume and not overwrite:  # every rank checks, so that none waits on a refusal
            raise RunExistsError(f"{self.run_dir} already holds a run (checkpoints up to {existing[-1].stem}); "
                                 "continue it with --resume, start over with --overwrite, or choose another --run-dir")
        if main and existing and overwrite and not resume:
            for old in existing:
                old.unlink()
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.run_dir / "config.yaml",
                               yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False).encode())
            for stale in self.checkpoint_dir.glob(".step_*.tmp"):  # left by a kill during a save
                stale.unlink(missing_ok=True)
        if resume:
            path = self.latest_checkpoint() if resume is True else Path(resume)
            if path is None:
                raise FileNotFoundError(f"nothing to resume: no checkpoint in {self.checkpoint_dir}")
            load_state(self, path, allow_changes=allow_changes)
            self.log.truncate(self.step)
        else:
            self.log.reset()
        barrier(self.dist)
        self.log.open()

    def fit(self, *, resume: bool | str | Path = False, stop_after: int | None = None,
            on_step: Callable[[int, dict[str, float]], None] | None = None, overwrite: bool = False,
            allow_changes: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
        """Train to ``total_steps`` (or stop early after ``stop_after`` steps, e.g. to test
        resumption); ``resume=True`` continues from the run's latest checkpoint; ``on_step(step,
        metrics)`` is called after every step (e.g. to drive an outer progress bar).

        A run folder that already holds checkpoints is refused (:class:`RunExistsError`) unless
        the call resumes it or passes ``overwrite=True`` (its checkpoints are deleted first). A
        resume refuses a config that differs from the checkpoint's, except in the keys of
        :data:`~visionmoe.train.persist.RESUME_SAFE_KEYS` and ``allow_changes`` (dotted keys,
        e.g. ``"schedule.max_steps"``). One trainer at a time per run folder: while one runs, a
        second is refused (:class:`~visionmoe.train.lock.RunLockedError`); a killed run's lock is
        taken over."""
        lock = RunLock(self.run_dir) if self.dist.is_main else None  # one trainer per run folder
        if lock is not None:
            lock.acquire()
        try:
            return self._fit(resume, stop_after, on_step, overwrite, tuple(allow_changes))
        finally:
            if lock is not None:
                lock.release()

    def _fit(self, resume, stop_after, on_step, overwrite, allow_changes) -> dict[str, Any]:
        self._start(resume, overwrite, allow_changes)
        # run.deterministic: the thread count stays torch's, so a resumed session cannot differ
        # from the first in how its ops split their sums
        threads = ThreadGovernor() if self.cfg.run.threads == "auto" and not self.cfg.run.deterministic else None
        try:
            return self._loop(stop_after, on_step, threads)
        finally:
            if threads is not None:
                threads.stop()

    def _loop(self, stop_after, on_step, threads) -> dict[str, Any]:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        c = self.cfg
        main = self.dist.is_main
        if threads is not None:
            threads.start()
        cols = [TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
        eval_every = max(1, round(c.run.eval_every_epochs * self.steps_per_epoch))
        end = self.total_steps if stop_after is None else min(self.total_steps, self.step + stop_after)
        t0, seen, start_step, a2a_bytes = time.perf_counter(), 0, self.step, 0
        last_eval: dict[str, Any] = {}
        loader = train_loader(self.train_set, self.sampler(self.step, end), workers=self.workers,
                              pin_memory=self.ctx.pin_memory)
        with Progress(*cols, disable=not (c.run.progress and main)) as bar:
            if main and c.run.print_eval:
                bar.console.print(self.describe() + (f"; {threads.describe()}" if threads is not None else ""))
            task = bar.add_task("train", total=self.total_steps, completed=self.step, info="")
            for batch in loader if self.step < end else ():
                batch = self.ctx.to_device(batch)
                sent = sent_bytes(self.model) if self.expert_parallel > 1 else 0
                m = self.train_step(batch)
                a2a_bytes += sent_bytes(self.model) - sent if self.expert_parallel > 1 else 0
                seen += len(batch[0]) * self.dist.world  # images of the global batch
                ips = seen / (time.perf_counter() - t0)
                acc = f" acc {m['acc']:.2f}" if "acc" in m else ""
                bar.update(task, advance=1, info=f"loss {m['loss']:.3f}{acc} {ips:.0f} img/s")
                if on_step is not None:
                    on_step(self.step, m)
                self._after_step(m, bar, ips, t0)
                if threads is not None:
                    threads.update()
                if self.step % eval_every == 0 or self.step == self.total_steps:
                    last_eval = self._evaluate_and_log(bar, t0)
                if c.run.keep_checkpoints and (self.step % c.run.checkpoint_every == 0 or self.step == end):
                    self.save()
        if not last_eval:  # nothing ran (e.g. resuming a finished run) or no evaluation was due
            last_eval = self.evaluate()
        elapsed = time.perf_counter() - t0
        summary = {"run_dir": str(self.run_dir), "step": self.step, "total_steps": self.total_steps,
                   "finished": self.step >= self.total_steps, "train_seconds": elapsed,
                   "train_img_per_s": seen / elapsed if elapsed > 0 else 0.0,
                   "steps_this_session": self.step - start_step, "skipped_steps": self.skipped_steps,
                   "device": str(self.device), "params": count_parameters(self.model), **last_eval}
        if self.expert_parallel > 1:  # bytes this rank sent to other ranks' experts (and gradients back)
            summary["all_to_all_mb_per_step"] = a2a_bytes / max(1, self.step - start_step) / 1e6
        if main:
            atomic_write_bytes(self.run_dir / "summary.json", json.dumps(summary, indent=2).encode())
        self.log.close()
        return summary

    def _after_step(self, m: dict[str, float], bar, ips: float, t0: float) -> None:
        c = self.cfg
        if m.get("skipped"):
            bar.console.print(f"step {self.step}: NaN/Inf loss or gradient, update skipped "
                              f"({self.skipped_steps} of at most {c.run.max_skipped_steps})")
            self.log.write({"step": self.step, "skipped_step": True, "skipped_steps": self.skipped_steps})
        for msg in self.monitor.update(self.model, self.step) if self.dist.is_main else []:
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            bar.console.print(f"[yellow]warning:[/] {msg}")
            self.log.write({"step": self.step, "warning": msg})
        if self.step % c.run.log_every == 0 or self.step == self.total_steps:
            if self.dist.enabled:  # the mean over the ranks
                m = {k: v / self.dist.world for k, v in all_reduce_sums(m, self.dist).items()}
            self.log.write({"step": self.step, "epoch": self.step / self.steps_per_epoch, **m, "img_per_s": ips,
                            "elapsed_s": round(time.perf_counter() - t0, 2), "routing": self.routing_stats()})
            self.log.scalars("train", m, self.step)

    def _evaluate_and_log(self, bar, t0: float) -> dict[str, Any]:
        res = self.evaluate()
        self.log.write({"step": self.step, "epoch": self.step / self.steps_per_epoch,
                        "elapsed_s": round(time.perf_counter() - t0, 2), **res})
        headline = next((k for k in res if k != "routing"), None)
        if headline is not None and self.dist.is_main and self.cfg.run.print_eval:  # None: no test images
            bar.console.print(f"step {self.step}: {headline} {res[headline]:.4f}")
        if headline is not None:
            self.log.scalars("test", {headline: res[headline]}, self.step)
        return res
