"""Evaluation protocols on frozen or fine-tuned backbones."""

from .features import extract_features

__all__ = ["extract_features"]
