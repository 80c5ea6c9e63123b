"""Checkpoints: one safetensors file holding model, optimizer, EMA and RNG tensors, with the
JSON state (step, config, optimizer hyper-parameters, RNG scalars) in its metadata.

Written atomically (temporary file in the same folder, fsync, rename), so a crash never
leaves a half-written checkpoint under the final name; read without unpickling anything.
A SHA-256 of every tensor's bytes and the JSON state is kept in the metadata and checked on
load, so a truncated or damaged file is refused (and the newest good sibling named). The hash
protects against damage, not against a deliberate rewrite (whoever edits the file can
recompute it); files without one load only inside :func:`allow_unverified_checkpoints`.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .._utils import atomic_write_bytes, file_mode, temp_beside

__all__ = ["save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state", "atomic_write_bytes",
           "CheckpointError", "ForeignCheckpointError", "verify_checkpoint", "allow_unverified_checkpoints"]

FORMAT = "visionmoe-checkpoint-v2"  # v2: with a SHA-256; v1 files (no checksum) load only when allowed


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted: corrupt, truncated, tampered or not ours."""


class ForeignCheckpointError(CheckpointError):
    """A sound safetensors file that visionmoe's trainer did not write (e.g. timm weights)."""


def _digest(tensors: dict[str, Tensor], meta_json: str) -> str:
    """SHA-256 over the names, dtypes, shapes and raw bytes of the tensors (sorted by name)
    and the JSON metadata."""
    h = hashlib.sha256(meta_json.encode())
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Torch (CPU, and every CUDA device once CUDA is in use), numpy and python RNG states as
    (tensors, JSON-able)."""
    np_state = np.random.get_state()  # noqa: NPY002 - the legacy global RNG is what libraries use
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    meta = {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": _py_state_to_json(random.getstate())}
    return tensors, meta


def set_rng_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda")), key=lambda k: int(k[4:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)  # a CPU-only resume ignores them
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
    meta: dict[str, Any] = {"state": state, "format": FORMAT}
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
    fd, tmp = temp_beside(path)
    os.close(fd)
    try:
        meta_json = json.dumps(meta)
        save_file(tensors, tmp, metadata={"visionmoe": meta_json, "sha256": _digest(tensors, meta_json)})
        os.chmod(tmp, file_mode())  # safetensors re-creates the file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _good_siblings(path: Path) -> list[Path]:
    """The trainer's other checkpoints (``step_*``) in ``path``'s folder that verify, newest first."""
    return [p for p in sorted(path.parent.glob("step_*.safetensors"), reverse=True)
            if p != path and verify_checkpoint(p) is None]


_ALLOW_UNVERIFIED: contextvars.ContextVar[bool] = contextvars.ContextVar("allow_unverified", default=False)


@contextlib.contextmanager
def allow_unverified_checkpoints() -> Iterator[None]:
    """Within the block, checkpoints without a checksum (format v1) load, with a warning. The
    checksum guards against damage, not against someone who rewrites the file on purpose (they
    can recompute it): only load files you trust."""
    token = _ALLOW_UNVERIFIED.set(True)
    try:
        yield
    finally:
        _ALLOW_UNVERIFIED.reset(token)


def _read(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    from safetensors import safe_open

    with open(path, "rb"):  # a file we may not read is not a damaged one: its OSError goes to the caller as is
        pass
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt, truncated or not a safetensors file ({e})") from e
    raw = metadata.get("visionmoe")
    if raw is None:
        raise ForeignCheckpointError(f"{path} is a safetensors file but not a visionmoe checkpoint (no metadata)")
    expected = metadata.get("sha256")
    if expected is not None and _digest(tensors, raw) != expected:
        raise CheckpointError(f"checkpoint {path} fails its SHA-256 check: it was modified or damaged after saving")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path} has unreadable metadata ({e})") from e
    if expected is None:
        if meta.get("format") != "visionmoe-checkpoint-v1":
            raise CheckpointError(f"checkpoint {path} has lost its SHA-256 checksum: it was modified after saving")
        if not _ALLOW_UNVERIFIED.get():  # anyone can declare the old format: never accept it silently
            raise CheckpointError(f"checkpoint {path} has no checksum (format v1, from before checksums, or one "
                                  "stripped and relabelled): it cannot be verified; if you trust the file, pass "
                                  "--allow-unverified (Python: with allow_unverified_checkpoints(): ...)")
        import warnings

        warnings.warn(f"{path} was saved by an older visionmoe without a checksum; loaded unverified, as asked",
                      stacklevel=3)
    return tensors, meta


def verify_checkpoint(path: str | Path) -> str | None:
    """None if ``path`` is a sound visionmoe checkpoint, else the reason it is not."""
    try:
        _read(Path(path))
    except CheckpointError as e:
        return str(e)
    return None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Returns ``{"model", "state", "optimizer", "ema", "objective", "rng"}`` (None where absent).
    Raises :class:`CheckpointError` (a ``ValueError``) for a corrupt, truncated or tampered
    file, naming the newest good checkpoint beside it if there is one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        tensors, meta = _read(path)
    except ForeignCheckpointError:
        raise
    except CheckpointError as e:
        good = _good_siblings(path)
        hint = f"; the newest good checkpoint beside it is {good[0]}" if good else ""
        raise CheckpointError(f"{e}{hint}") from None
    groups: dict[str, dict[str, Tensor]] = {"model": {}, "optim": {}, "ema": {}, "rng": {}, "objective": {}}
    for k, v in tensors.items():
        head, _, rest = k.partition(".")
        if head not in groups or not rest:
            raise CheckpointError(f"checkpoint {path} has an unexpected tensor name {k!r}")
        groups[head][rest] = v
    return {
        "model": groups["model"],
        "state": meta["state"],
        "optimizer": _join_optimizer(groups["optim"], meta["optimizer"]) if "optimizer" in meta else None,
        "ema": groups["ema"] or None,
        "objective": groups["objective"] or None,
        "rng": (groups["rng"], meta["rng"]) if "rng" in meta else None,
    }
