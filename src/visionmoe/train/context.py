"""The run context: where a run computes (device, process group) and in which precision.

Everything the loop, :func:`~visionmoe.train.evaluation.evaluate` and the objectives need to
know about the hardware comes from one :class:`RunContext`; nothing else asks
``torch.cuda`` or the environment.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .distributed import DistInfo, init_distributed, launch_ranks

__all__ = ["RunContext", "resolve_device"]


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` (this process's
    ``LOCAL_RANK`` GPU under torchrun), ``cuda:N`` or ``mps``; a device that is not there is
    refused with the way out."""
    name = str(name).strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"run.device={name} but this PyTorch sees no CUDA GPU; use run.device=cpu (or auto)")
        index = int(name.split(":", 1)[1]) if ":" in name else local_rank
        if index >= torch.cuda.device_count():
            raise ValueError(f"run.device=cuda:{index} but only {torch.cuda.device_count()} GPU(s) are visible")
        return torch.device("cuda", index)
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError("run.device=mps but the Metal backend is not available; use run.device=cpu")
        return torch.device("mps")
    raise ValueError(f"run.device={name!r} is not a device; use auto, cpu, cuda, cuda:N or mps")


@dataclass
class RunContext:
    """Device, process group and numerics of a run.

    ``amp``: ``none``; ``bf16`` (autocast on the device's type, CPU and CUDA); ``fp16`` (CUDA
    only, with a ``torch.amp.GradScaler``)."""

    device: torch.device
    dist: DistInfo
    amp: str = "none"
    scaler: Any = None

    @classmethod
    def create(cls, *, device: str = "auto", amp: str = "none", tf32: bool = True) -> RunContext:
        local = launch_ranks()[2]
        dev = resolve_device(device, local)
        if amp == "fp16" and dev.type != "cuda":
            raise ValueError(f"run.amp=fp16 needs a CUDA device (this run is on {dev}); use run.amp=bf16 or none")
        if amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"run.amp must be none, bf16 or fp16, got {amp!r}")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            if tf32:
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
        info = init_distributed(backend="nccl" if dev.type == "cuda" else "gloo")
        scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
        return cls(dev, info, amp, scaler)

    def autocast(self):
        if self.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.amp == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def to_device(self, batch: tuple) -> tuple:
        nb = self.device.type == "cuda"
        return tuple(t.to(self.device, non_blocking=nb) if isinstance(t, Tensor) else t for t in batch)

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else str(self.device)
        procs = f", {self.dist.world} processes" if self.dist.enabled else ""
        return f"device {self.device} ({name}){procs}, amp {self.amp}"
