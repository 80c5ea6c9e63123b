"""Image features from a backbone, for clustering (MoCE), k-NN and linear probes.

Axis legend: N images, T tokens, D width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import adapt

__all__ = ["extract_features"]


@torch.no_grad()
def extract_features(
    model: nn.Module,
    x: Tensor,
    *,
    pool: str = "mean",
    batch_size: int = 256,
    normalize: bool = True,
    routing_key: Tensor | None = None,
    img_size: int | None = None,
    channels: int | None = None,
) -> Tensor:
    """``(N, C, H, W) -> (N, D)`` features from ``model.forward_features`` (all patches visible).

    Args:
        pool: ``"mean"`` of the patch tokens (MAE features), ``"cls"`` (the CLS token).
        normalize: unit l2 norm (what MoCE's clustering expects).
        routing_key: optional ``(N,)`` keys for keyed MoE routers.
        img_size, channels: adapt the images first (default: the model's).
    """
    if pool not in ("mean", "cls"):
        raise ValueError(f"pool must be 'mean' or 'cls', got {pool!r}")
    was = model.training
    model.eval()
    pe = getattr(model, "patch_embed", None)
    img_size = img_size or (pe.img_size[0] if pe is not None else None)
    channels = channels or (pe.proj.in_channels if pe is not None else None)
    prefix = getattr(model, "num_prefix_tokens", 1)
    out = []
    for i in range(0, len(x), batch_size):
        xb = adapt(x[i : i + batch_size], channels=channels, size=img_size)
        key = routing_key[i : i + batch_size] if routing_key is not None else None
        tokens = model.forward_features(xb, routing_key=key) if key is not None else model.forward_features(xb)
        f = tokens[:, prefix:].mean(1) if pool == "mean" else tokens[:, 0]  # (B, D)
        out.append(F.normalize(f, dim=-1) if normalize else f)
    model.train(was)
    return torch.cat(out) if out else x.new_zeros(0, getattr(model, "embed_dim", 0))
