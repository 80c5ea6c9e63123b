"""Training objectives: ``nn.Module`` s with ``forward(model, batch) -> {"loss": ..., metrics...}``,
registered by name (``objective: mae`` in a config)."""

from .base import OBJECTIVES, Objective, create_objective, objective_arguments, register_objective
from .classification import ClassificationObjective
from .mae import MAEDecoder, MAEObjective, patchify, random_masking, unpatchify
from .moco import MoCoObjective, TwoViewAugment, match_patches, ogar_loss, patch_boxes
from .segmentation import SegmentationObjective, confusion_matrix, segmentation_scores

__all__ = ["Objective", "OBJECTIVES", "register_objective", "create_objective", "objective_arguments",
           "ClassificationObjective", "MAEObjective", "MAEDecoder", "random_masking", "patchify", "unpatchify",
           "MoCoObjective", "TwoViewAugment", "match_patches", "ogar_loss", "patch_boxes", "SegmentationObjective",
           "confusion_matrix", "segmentation_scores"]
