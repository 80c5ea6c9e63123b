"""Named model variants: a registry of arguments and one factory."""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import inspect
from collections.abc import Callable
from typing import Any

from timm.models.vision_transformer import VisionTransformer as _TimmViT
from torch import nn

from .._utils import did_you_mean
from ..moe.config import MoEConfig
from .vit import VisionTransformer

__all__ = ["register_model", "create_model", "list_models", "model_args", "model_description"]


@dataclasses.dataclass
class _Entry:
    builder: Callable[..., nn.Module]
    kwargs: dict[str, Any]
    description: str


_REGISTRY: dict[str, _Entry] = {}
_VIT_ARGS = set(inspect.signature(_TimmViT.__init__).parameters) - {"self"}
_MOE_ARGS = {f.name for f in dataclasses.fields(MoEConfig)}


def register_model(
    name: str, builder: Callable[..., nn.Module] = VisionTransformer, description: str = "", **kwargs: Any
) -> None:
    """Register ``name`` as ``builder(**kwargs)``."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = _Entry(builder, kwargs, description)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def model_args(name: str) -> dict[str, Any]:
    """The registered arguments of ``name`` (a copy)."""
    return copy.deepcopy(_entry(name).kwargs)


def model_description(name: str) -> str:
    """The one-line description ``name`` was registered with."""
    return _entry(name).description


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        hint = did_you_mean(name, _REGISTRY, n=3, cutoff=0.5)
        raise ValueError(f"unknown model name {name!r}.{hint} See visionmoe.list_models().")
    return _REGISTRY[name]


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered variant, overriding any of its arguments.

    Overrides may be timm ViT arguments (``num_classes=10, img_size=28, in_chans=1``),
    ``moe=dict(...)`` / ``moe=None`` (dense), or MoE fields given flat
    (``num_experts=4, top_k=2, placement="last_2"``), which are merged into the variant's
    MoE settings. Unknown names are rejected with close matches suggested.

    Example:
        >>> import visionmoe
        >>> m = visionmoe.create_model("vmoe_nano_patch4_32", num_classes=10, num_experts=4)
    """
    entry = _entry(name)
    kwargs = copy.deepcopy(entry.kwargs)
    moe = kwargs.pop("moe", None)
    moe = dict(MoEConfig.from_dict(moe).to_dict()) if moe is not None else None
    if "moe" in overrides:
        new = overrides.pop("moe")
        if new is None:
            moe = None
        else:
            new = new.to_dict() if isinstance(new, MoEConfig) else dict(new)
            moe = {**(moe or {}), **new}
    flat_moe = {k: overrides.pop(k) for k in list(overrides) if k in _MOE_ARGS and k not in _VIT_ARGS}
    if flat_moe:
        moe = {**(moe or {}), **flat_moe}
    if entry.builder is VisionTransformer:
        unknown = [k for k in overrides if k not in _VIT_ARGS]
        if unknown:
            k = unknown[0]
            hint = did_you_mean(k, _VIT_ARGS | _MOE_ARGS | {"moe"}, n=3)
            raise ValueError(f"unknown argument {k!r} for model {name!r}.{hint}")
    kwargs.update(overrides)
    if entry.builder is not VisionTransformer:
        for k in ("img_size",):  # ViT-only sizing arguments the Trainer may pass to any model
            kwargs.pop(k, None)
    return entry.builder(moe=moe, **kwargs)


# ---------------------------------------------------------------------------- variants
_NANO = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0)
_MINI28 = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0)
_TINY = dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0)
_VIT_S16 = dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6)
_VIT_B16 = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12)
_VIT_S14_DINOV2 = dict(img_size=518, patch_size=14, embed_dim=384, depth=12, num_heads=6, init_values=1e-5)
_VMOE = dict(placement="every_2", num_experts=8, top_k=2, noise_std=1.0, capacity_factor=1.05)

register_model("vit_nano_patch4_32", description="CPU-sized dense ViT (D 96, depth 4)", **_NANO)
register_model("vit_mini_patch4_28", description="CPU-sized dense ViT for 28x28 grey images (D 128, depth 6)",
               **_MINI28)
register_model("vit_tiny_patch4_32", description="CPU-sized dense ViT (D 192, depth 6)", **_TINY)
register_model("vit_small_patch16_224", description="ViT-S/16", **_VIT_S16)
register_model("vit_base_patch16_224", description="ViT-B/16", **_VIT_B16)
register_model("vit_small_patch14_dinov2", description="DINOv2 ViT-S/14 layout", **_VIT_S14_DINOV2)

register_model(
    "vmoe_nano_patch4_32",
    description="CPU-sized V-MoE: every-2, 4 experts, top-1, dropless",
    moe=dict(placement="every_2", num_experts=4, top_k=1),
    **_NANO,
)
register_model(
    "vmoe_mini_patch4_28",
    description="CPU-sized V-MoE for 28x28 grey images: every-2, 8 experts, top-2, cf 1.05",
    moe=dict(_VMOE),
    **_MINI28,
)
register_model(
    "vmoe_tiny_patch4_32",
    description="CPU-sized V-MoE: every-2, 8 experts, top-2, cf 1.05 (V-MoE recipe)",
    moe=dict(_VMOE),
    **_TINY,
)
register_model(
    "vmoe_tiny_patch4_32_last2",
    description="CPU-sized V-MoE: last-2, 8 experts, top-1",
    moe=dict(_VMOE, placement="last_2", top_k=1),
    **_TINY,
)
register_model(
    "vmoe_small_patch16_224",
    description="V-MoE-S/16: every-2, 32 experts, top-2 (Riquelme et al. 2021)",
    moe=dict(_VMOE, num_experts=32),
    **_VIT_S16,
)
register_model(
    "vmoe_base_patch16_224",
    description="V-MoE-B/16: every-2, 32 experts, top-2 (Riquelme et al. 2021)",
    moe=dict(_VMOE, num_experts=32),
    **_VIT_B16,
)
register_model(
    "crmoe_small_patch16_224",
    description="CR-MoE V-MoE-S/16: every-2, 16 experts, top-2, expert hidden 2D, no capacity limit",
    moe=dict(placement="every_2", num_experts=16, top_k=2, expert_hidden=768, noise_std=0.0,
             aux_weights={"importance": 0.01}),
    **_VIT_S16,
)
register_model(
    "moce_tiny_patch4_32",
    description="CPU-sized MoCE: cluster-conditional experts in the last 2 blocks, 8 experts, K=1",
    moe=dict(placement="last_2", num_experts=8, top_k=1, routing="cluster", num_keys=16,
             aux_weights={"imbalance": 0.01}),
    **_TINY,
)
register_model(
    "vimoe_small_patch14_dinov2",
    description="ViMoE on DINOv2 ViT-S/14: last-2, 8 experts, top-1, CLS routing, shared expert",
    moe=dict(placement="last_2", num_experts=8, top_k=1, routing="cls", shared_expert=True,
             aux_weights={"gshard": 0.01}),
    **_VIT_S14_DINOV2,
)


# ---------------------------------------------------------------------------- ConvNeXt (Sweet spot)
def _convnext(*, moe: dict | None = None, **kwargs: Any) -> nn.Module:
    """timm's ConvNeXt with linear (``conv_mlp=False``) MLPs, optionally turned into a MoE by
    :func:`visionmoe.moe.moeify` (experts = the pointwise MLPs, gate over every position).
    One stage with a patch stem and no downsampling is the isotropic ConvNeXt."""
    from timm.models.convnext import ConvNeXt

    from ..moe.upcycle import moeify

    depths, dims = tuple(kwargs.pop("depths")), tuple(kwargs.pop("dims"))
    isotropic = len(depths) == 1
    if isotropic:  # timm builds 4 stages: put every block in the first and drop the empty rest
        depths, dims = (depths[0], 0, 0, 0), dims * 4
    model = ConvNeXt(conv_mlp=False, depths=depths, dims=dims, **kwargs)
    if isotropic:
        model.stages = model.stages[:1]
    if moe:
        moeify(model, **moe)
    return model


_CONVNEXT_MOE = dict(placement="every_2", num_experts=8, top_k=1, noise_std=1.0, capacity_factor=None)
register_model("convnext_cpu", _convnext, "CPU-sized hierarchical ConvNeXt: depths 2-2-2-2, dims 32-64-128-256",
               depths=(2, 2, 2, 2), dims=(32, 64, 128, 256))
register_model("convnext_moe_cpu", _convnext, "CPU-sized ConvNeXt MoE: every-2, 8 experts, top-1",
               depths=(2, 2, 2, 2), dims=(32, 64, 128, 256), moe=dict(_CONVNEXT_MOE))
register_model("convnext_tiny", _convnext, "ConvNeXt-T: depths 3-3-9-3, dims 96-192-384-768",
               depths=(3, 3, 9, 3), dims=(96, 192, 384, 768))
register_model("convnext_moe_tiny", _convnext, "ConvNeXt-T MoE (Sweet spot): last-2, 8 experts, top-1",
               depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), moe=dict(_CONVNEXT_MOE, placement="last_2"))
register_model("convnext_iso_cpu", _convnext, "CPU-sized isotropic ConvNeXt: patch 4, 6 blocks, width 64",
               depths=(6,), dims=(64,), patch_size=4)
register_model("convnext_iso_moe_cpu", _convnext, "CPU-sized isotropic ConvNeXt MoE: every-2, 8 experts, top-1",
               depths=(6,), dims=(64,), patch_size=4, moe=dict(_CONVNEXT_MOE))
register_model("convnext_iso_small", _convnext, "isotropic ConvNeXt-S: patch 16, 18 blocks, width 384",
               depths=(18,), dims=(384,), patch_size=16)
