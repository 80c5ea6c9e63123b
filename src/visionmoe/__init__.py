"""visionmoe: vision Mixture-of-Experts on PyTorch and timm.

Quick start::

    import visionmoe
    model = visionmoe.create_model("vmoe_nano_patch4_32", num_classes=10)
    logits = model(images)                  # (B, 10)
    loss = criterion(logits, y) + model.moe_aux_loss()
    print(model.routing_stats())
"""

from . import moe
from .models import VisionTransformer, count_parameters, create_model, list_models
from .moe import MoE, MoEConfig, moeify

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "moe",
    "create_model",
    "list_models",
    "count_parameters",
    "VisionTransformer",
    "MoE",
    "MoEConfig",
    "moeify",
]
