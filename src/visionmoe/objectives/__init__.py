"""Training objectives: callables ``(model, batch) -> {"loss": ..., metrics...}``."""

from .classification import ClassificationObjective

__all__ = ["ClassificationObjective"]
