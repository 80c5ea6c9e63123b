"""Training objectives: callables ``(model, batch) -> {"loss": ..., metrics...}``."""

from .classification import ClassificationObjective
from .mae import MAEDecoder, MAEObjective, patchify, random_masking, unpatchify
from .moco import MoCoObjective, TwoViewAugment, match_patches, ogar_loss, patch_boxes
from .segmentation import SegmentationObjective, confusion_matrix, segmentation_scores

__all__ = ["ClassificationObjective", "MAEObjective", "MAEDecoder", "random_masking", "patchify", "unpatchify",
           "MoCoObjective", "TwoViewAugment", "match_patches", "ogar_loss", "patch_boxes", "SegmentationObjective",
           "confusion_matrix", "segmentation_scores"]
