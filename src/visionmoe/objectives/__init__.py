"""Training objectives: callables ``(model, batch) -> {"loss": ..., metrics...}``."""

from .classification import ClassificationObjective
from .mae import MAEDecoder, MAEObjective, patchify, random_masking, unpatchify

__all__ = ["ClassificationObjective", "MAEObjective", "MAEDecoder", "random_masking", "patchify", "unpatchify"]
