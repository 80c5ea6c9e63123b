"""Loader throughput: how many training images per second the streaming pipeline decodes and
augments from a folder (timm's RandomResizedCrop + flip from JPEG, ``workers`` processes),
beside how many a model's training step consumes on this machine, so one sees which is the
bottleneck. ``visionmoe bench-data ROOT``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["loader_throughput", "run_data_bench"]


def loader_throughput(root: str | Path, *, size: int = 224, workers: int = 2, batch_size: int = 64,
                      batches: int = 20, augment: str = "rrc", channels: int = 3) -> dict[str, Any]:
    """Images/s of the training loader over ``batches`` batches after one warm-up batch (the
    workers' start-up is not counted)."""
    from ..data.preprocess import Preprocessing, resolve_normalization
    from ..data.streaming import StepBatchSampler, open_image_folder, train_loader, training_set

    data = open_image_folder(root, test_fraction=0.0, channels=channels)
    mean, std = resolve_normalization("imagenet", channels)
    ds = training_set(data, Preprocessing(size, channels, resize="crop", mean=mean, std=std), seed=0, augment=augment)
    sampler = StepBatchSampler(len(ds), min(batch_size, len(ds)), seed=0, start=0, stop=batches + 1)
    it = iter(train_loader(ds, sampler, workers=workers, pin_memory=False))
    next(it)
    t0, n = time.perf_counter(), 0
    for x, _ in it:
        n += len(x)
    dt = time.perf_counter() - t0
    return {"images_per_s": n / dt, "images": n, "seconds": dt, "workers": workers, "size": size,
            "batch_size": sampler.bs, "augment": augment, "files": len(ds)}


def model_throughput(root: str | Path, model: str, *, size: int, batch_size: int, steps: int, workers: int,
                     threads: int | None, device: str, amp: str) -> dict[str, Any]:
    """Training images/s of ``model`` on the same folder through the Trainer (loader included)."""
    import tempfile

    from ..train import Trainer, config_from_dict

    cfg = config_from_dict({"model": {"name": model}, "data": {"name": "image_folder", "args": {
        "root": str(root), "test_fraction": 0.0}, "augment": "rrc", "resize": "crop", "normalize": "imagenet",
        "batch_size": batch_size, "workers": workers, "img_size": size},
        "schedule": {"max_steps": steps + 2, "warmup_epochs": 0},
        "run": {"progress": False, "print_eval": False, "eval_every_epochs": 1e9, "checkpoint_every": 10**9,
                "keep_checkpoints": 1, "threads": threads, "device": device, "amp": amp}})
    with tempfile.TemporaryDirectory() as tmp:
        t = Trainer(cfg, run_dir=tmp)
        t.fit(stop_after=1)  # a first step: allocations, optimizer state
        dt = _timed_steps(t, steps)
    return {"model": model, "images_per_s": steps * batch_size / dt, "steps": steps, "batch_size": batch_size,
            "device": str(t.device), "amp": amp, "threads": threads or torch.get_num_threads()}


def _timed_steps(t, steps: int) -> float:
    """Seconds for ``steps`` training steps of a started Trainer, fed by its loader, after one
    untimed step that starts the loader's workers."""
    from ..data.streaming import train_loader

    loader = train_loader(t.train_set, t.sampler(t.step, t.step + steps + 1), workers=t.workers,
                          pin_memory=t.ctx.pin_memory)
    t0 = None
    for batch in loader:
        t.train_step(t.ctx.to_device(batch))
        if t0 is None:  # the first batch waited for the workers to start
            if t.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
    if t.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_data_bench(root: str | Path, *, size: int = 224, workers: int = 2, batch_size: int = 64, batches: int = 20,
                   model: str | None = "vit_small_patch16_224", model_batch: int = 16, model_steps: int = 5,
                   threads: int | None = None, device: str = "auto", amp: str = "none",
                   out: str | Path | None = None) -> dict[str, Any]:
    res: dict[str, Any] = {"loader": loader_throughput(root, size=size, workers=workers, batch_size=batch_size,
                                                      batches=batches)}
    if model:
        res["model"] = model_throughput(root, model, size=size, batch_size=model_batch, steps=model_steps,
                                        workers=workers, threads=threads, device=device, amp=amp)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "bench_data.json").write_text(json.dumps(res, indent=2))
    return res
