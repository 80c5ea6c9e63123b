"""What the study recipes share: their config pattern (defaults or ``quick()``, then a YAML
file's keys, then ``key=value`` overrides, every key and value checked)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

__all__ = ["study_config"]


def study_config(cls: Any, overrides: list[str] | None = None, *, quick: bool = False,
                 path: str | Path | None = None) -> Any:
    """An instance of the study-config dataclass ``cls``: its defaults (``cls.quick()`` when
    ``quick`` or the file says ``quick: true``), then the keys of the YAML file ``path``, then
    ``key=value`` ``overrides``; unknown keys and wrong types are refused with a suggestion."""
    from ..train.config import apply_overrides, dataclass_from_dict, load_yaml_dict

    d = apply_overrides(load_yaml_dict(path) if path is not None else {}, list(overrides or []))
    base = asdict(cls.quick() if quick or d.pop("quick", False) else cls())
    return dataclass_from_dict(cls, {**base, **d})
