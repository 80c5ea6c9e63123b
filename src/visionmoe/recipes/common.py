"""What the study recipes share: their config pattern (defaults or ``quick()``, then a YAML
file's keys, then ``key=value`` overrides, every key and value checked) and the reading of a
run's logged loss curve."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

__all__ = ["study_config", "logged_curve", "curve_summary"]


def study_config(cls: Any, overrides: list[str] | None = None, *, quick: bool = False,
                 path: str | Path | None = None) -> Any:
    """An instance of the study-config dataclass ``cls``: its defaults (``cls.quick()`` when
    ``quick`` or the file says ``quick: true``), then the keys of the YAML file ``path``, then
    ``key=value`` ``overrides``; unknown keys and wrong types are refused with a suggestion."""
    from ..train.config import apply_overrides, dataclass_from_dict, load_yaml_dict

    d = apply_overrides(load_yaml_dict(path) if path is not None else {}, list(overrides or []))
    base = asdict(cls.quick() if quick or d.pop("quick", False) else cls())
    return dataclass_from_dict(cls, {**base, **d})


def logged_curve(run_dir: str | Path, key: str = "loss") -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``key`` in a run's ``metrics.jsonl`` (rows without it, or with a
    null value, skipped)."""
    import json

    rows = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if r.get(key) is not None]
    return [r["step"] for r in rows], [r[key] for r in rows]


def curve_summary(values: list[float]) -> dict:
    """Whether a loss curve falls: ``{"first", "last", "falls"}`` with the means of its first
    and last tenth; ``{}`` for an empty curve."""
    if not values:
        return {}
    k = max(1, len(values) // 10)
    first, last = sum(values[:k]) / k, sum(values[-k:]) / k
    return {"first": first, "last": last, "falls": last < first}
