"""Checkpoints: one safetensors file holding model, optimizer, EMA and RNG tensors, with the
JSON state (step, config, optimizer hyper-parameters, RNG scalars) in its metadata.

Written atomically (temporary file in the same folder, fsync, rename), so a crash never
leaves a half-written checkpoint under the final name; read without unpickling anything.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .._utils import atomic_write_bytes

__all__ = ["save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state", "atomic_write_bytes"]


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Torch, numpy and python RNG states as (tensors, JSON-able)."""
    np_state = np.random.get_state()  # noqa: NPY002 - the legacy global RNG is what libraries use
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_state[1].astype(np.int64))}
    meta = {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": _py_state_to_json(random.getstate())}
    return tensors, meta


def set_rng_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    random.setstate(_py_state_from_json(meta["python"]))


def _py_state_to_json(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_state_from_json(state):
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _split_optimizer(sd: dict) -> tuple[dict[str, Tensor], dict]:
    tensors, meta_state = {}, {}
    for pid, st in sd.get("state", {}).items():
        meta_state[str(pid)] = {}
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"{pid}.{k}"] = v
            else:
                meta_state[str(pid)][k] = v
    return tensors, {"state": meta_state, "param_groups": sd.get("param_groups", [])}


def _join_optimizer(tensors: dict[str, Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {int(pid): dict(v) for pid, v in meta["state"].items()}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    path: str | Path,
    *,
    model: dict[str, Tensor],
    state: dict[str, Any],
    optimizer: dict | None = None,
    ema: dict[str, Tensor] | None = None,
    objective: dict[str, Tensor] | None = None,
    rng: bool = True,
) -> Path:
    """Save a checkpoint atomically; ``state`` must be JSON-serialisable. ``objective`` holds
    the parameters an objective owns (e.g. the MAE decoder)."""
    tensors: dict[str, Tensor] = {f"model.{k}": v for k, v in model.items()}
    if objective:
        tensors.update({f"objective.{k}": v for k, v in objective.items()})
    meta: dict[str, Any] = {"state": state, "format": "visionmoe-checkpoint-v1"}
    if optimizer is not None:
        opt_t, opt_meta = _split_optimizer(optimizer)
        tensors.update({f"optim.{k}": v for k, v in opt_t.items()})
        meta["optimizer"] = opt_meta
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.items()})
    if rng:
        rng_t, rng_meta = rng_state()
        tensors.update({f"rng.{k}": v for k, v in rng_t.items()})
        meta["rng"] = rng_meta
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"visionmoe": json.dumps(meta)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Returns ``{"model", "state", "optimizer", "ema", "objective", "rng"}`` (None where absent).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("visionmoe")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"checkpoint {path} is corrupt or not a safetensors file: {e}") from e
    if raw is None:
        raise ValueError(f"{path} is a safetensors file but not a visionmoe checkpoint (no metadata)")
    meta = json.loads(raw)
    groups: dict[str, dict[str, Tensor]] = {"model": {}, "optim": {}, "ema": {}, "rng": {}, "objective": {}}
    for k, v in tensors.items():
        head, rest = k.split(".", 1)
        groups[head][rest] = v
    return {
        "model": groups["model"],
        "state": meta["state"],
        "optimizer": _join_optimizer(groups["optim"], meta["optimizer"]) if "optimizer" in meta else None,
        "ema": groups["ema"] or None,
        "objective": groups["objective"] or None,
        "rng": (groups["rng"], meta["rng"]) if "rng" in meta else None,
    }
