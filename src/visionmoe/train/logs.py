"""Metrics writers, apart from the loop: ``metrics.jsonl`` (one JSON record per line),
``metrics.csv`` (its numeric columns, written at the end) and optional TensorBoard scalars.
Only the main process writes; every rewrite of an existing file is atomic."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .._utils import atomic_write_bytes

__all__ = ["MetricsLog"]


def _finite(v: Any) -> Any:
    """JSON has no NaN / Inf: they are written as null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


class MetricsLog:
    """Writers of one run folder (``enabled=False`` on every rank but the main one)."""

    def __init__(self, run_dir: Path, *, enabled: bool = True, tensorboard: bool = False) -> None:
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.path = self.run_dir / "metrics.jsonl"
        self._tb = None
        self._want_tb = tensorboard and enabled

    def open(self) -> None:
        if self._want_tb and self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:
                print("tensorboard is not installed; logging to metrics.jsonl only")
                self._want_tb = False

    def reset(self) -> None:
        """A fresh run: the old log goes."""
        if self.enabled and self.path.exists():
            self.path.unlink()

    def truncate(self, step: int) -> None:
        """On resume: keep the records up to ``step`` (a line cut short by a kill is dropped)."""
        if not (self.enabled and self.path.exists()):
            return
        keep = []
        for ln in self.path.read_text().splitlines():
            try:
                rec = json.loads(ln)
            except json.JSONDecodeError:
                continue
            if rec.get("step", 0) <= step:
                keep.append(ln)
        atomic_write_bytes(self.path, "".join(ln + "\n" for ln in keep).encode())

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(_finite(record)) + "\n")

    def scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        if self._tb is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.enabled:
            self.write_csv()

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for ln in self.path.read_text().splitlines():
            try:
                out.append(json.loads(ln))
            except json.JSONDecodeError:
                continue
        return out

    def write_csv(self) -> None:
        rows = self.records()
        if not rows:
            return
        keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float))})
        lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in rows]
        atomic_write_bytes(self.run_dir / "metrics.csv", ("\n".join(lines) + "\n").encode())
