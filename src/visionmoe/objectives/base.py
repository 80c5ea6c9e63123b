"""The objective contract and its registry.

An objective is an ``nn.Module`` that owns whatever the loss needs besides the backbone (the
MAE decoder, MoCo's projectors and momentum encoder, a segmentation head) and has:

* ``forward(model, batch) -> {"loss": Tensor, metric: Tensor, ...}`` for a training batch
  ``(x, target[, routing_key])``;
* ``eval_batch(model, x, y, key, generator) -> {name: sum over the batch}``, summed over the
  test set and divided by its size by :func:`visionmoe.train.evaluate`;
* ``summarize(metrics) -> metrics`` to turn those averages into the reported numbers.

New objectives register with :func:`register_objective` and build themselves from a config
with :meth:`Objective.from_config`; ``objective: NAME`` in a YAML file picks one.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

from torch import nn

from .._utils import did_you_mean

__all__ = ["Objective", "OBJECTIVES", "register_objective", "create_objective", "objective_arguments"]

OBJECTIVES: dict[str, type[Objective]] = {}


class Objective(nn.Module):
    """Base class of training objectives (see the module docstring)."""

    name: ClassVar[str] = ""

    @classmethod
    def from_config(cls, model: nn.Module, *, num_classes: int, total_steps: int, run: Any,
                    args: dict[str, Any]) -> Objective:
        """Build from an experiment: ``args`` are its ``objective_args``; ``run`` its ``RunConfig``."""
        return cls(model, **args)

    def eval_batch(self, model: nn.Module, x, y, key=None, generator=None) -> dict[str, float]:  # pragma: no cover
        raise NotImplementedError

    def summarize(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return metrics


def register_objective(name: str):
    """Class decorator: make an :class:`Objective` available as ``objective: name``."""

    def wrap(cls: type[Objective]) -> type[Objective]:
        cls.name = name
        OBJECTIVES[name] = cls
        return cls

    return wrap


def _lookup(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}.{did_you_mean(name, OBJECTIVES)} Registered: "
                         f"{', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]


def objective_arguments(name: str) -> list[str]:
    """The keyword arguments ``objective_args`` may set for a registered objective."""
    params = inspect.signature(_lookup(name).__init__).parameters
    return [n for n, p in params.items() if n not in ("self", "model", "num_classes")
            and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def create_objective(name: str, model: nn.Module, *, num_classes: int, total_steps: int, run: Any,
                     args: dict[str, Any] | None = None) -> Objective:
    return _lookup(name).from_config(model, num_classes=num_classes, total_steps=total_steps, run=run,
                                     args=dict(args or {}))
