"""Backbones (ViT with MoE blocks), the model registry and checkpoint key mappings."""

from ._registry import create_model, list_models, model_args, model_description, register_model
from ._weights import (
    detect_layout,
    from_dinov2,
    from_mae,
    from_mocov3,
    load_dense_into_moe,
    load_matching_state_dict,
    load_state_dict_file,
    to_timm,
)
from .vit import VisionTransformer, count_parameters

__all__ = [
    "VisionTransformer",
    "count_parameters",
    "create_model",
    "list_models",
    "model_args",
    "model_description",
    "register_model",
    "detect_layout",
    "to_timm",
    "from_mae",
    "from_mocov3",
    "from_dinov2",
    "load_state_dict_file",
    "load_dense_into_moe",
    "load_matching_state_dict",
]
