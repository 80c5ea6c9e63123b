"""Evaluation protocols on frozen or fine-tuned backbones."""

from .features import extract_features
from .protocols import few_shot, label_subset, linear_probe, routing_consistency
from .transfer import knn_accuracy, knn_predict, logme

__all__ = ["extract_features", "knn_accuracy", "knn_predict", "logme", "label_subset", "linear_probe", "few_shot",
           "routing_consistency"]
