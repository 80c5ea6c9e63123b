"""Training: a compact supervised loop (the full YAML-driven engine is tracked in the training issue)."""

from .simple import evaluate, train_classifier

__all__ = ["train_classifier", "evaluate"]
