"""Evaluation protocols on frozen or fine-tuned backbones."""

from .backbone import SEMI_LRS, evaluate_backbone, head_first_layer, semi_finetune, semi_linear
from .features import extract_features
from .protocols import few_shot, label_subset, linear_probe, routing_consistency
from .transfer import knn_accuracy, knn_predict, logme

__all__ = ["evaluate_backbone", "semi_linear", "semi_finetune", "head_first_layer", "SEMI_LRS", "extract_features",
           "knn_accuracy", "knn_predict", "logme", "label_subset", "linear_probe", "few_shot", "routing_consistency"]
