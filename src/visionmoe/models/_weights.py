"""Checkpoint layouts as pure key mappings.

Every function maps a ``state_dict`` to a ``state_dict`` in timm's ViT layout
(``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.{i}.{norm1,attn,ls1,norm2,mlp,ls2}.*``,
``norm.*``, ``head.*``), which is also the layout of :class:`visionmoe.models.VisionTransformer`.
Loading files never unpickles arbitrary objects: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ..moe.upcycle import upcycle_state_dict

__all__ = [
    "detect_layout",
    "to_timm",
    "from_mae",
    "from_mocov3",
    "from_dinov2",
    "load_state_dict_file",
    "load_dense_into_moe",
    "load_matching_state_dict",
]


def load_matching_state_dict(model: nn.Module, sd: Mapping[str, Tensor], source: str = "the checkpoint") -> None:
    """``model.load_state_dict(sd)`` that, when the architectures differ, raises a
    ``ValueError`` naming the missing, unexpected and wrongly shaped tensors (a few of each)."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
              if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = [f"{label} ({len(items)}): {', '.join(items[:4])}{', ...' if len(items) > 4 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
                 if items]
        raise ValueError(
            f"{source} does not fit this model ({type(model).__name__}): {'; '.join(parts)}. It was saved from a "
            "different architecture; build the model it was trained with (its config is stored in the checkpoint), "
            "or upcycle dense weights into a MoE with model.init=PATH")
    model.load_state_dict(sd)


def _unwrap(sd: Mapping) -> dict[str, Tensor]:
    for key in ("model", "state_dict", "teacher", "module"):
        if key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    return dict(sd)


def detect_layout(sd: Mapping) -> str:
    """Guess the layout: ``"mae"``, ``"mocov3"``, ``"dinov2"`` or ``"timm"``."""
    sd = _unwrap(sd)
    keys = list(sd)
    if any(k.startswith("module.base_encoder.") or k.startswith("base_encoder.") for k in keys):
        return "mocov3"
    if any(k.startswith("decoder_") or k.startswith("decoder.") for k in keys):
        return "mae"
    if "mask_token" in sd or "register_tokens" in sd or any(".mlp.w12." in k for k in keys):
        return "dinov2"
    return "timm"


def from_mae(sd: Mapping) -> dict[str, Tensor]:
    """MAE (facebookresearch/mae ``models_mae.py``) -> timm: drop the decoder and mask token.
    The encoder already uses timm's names."""
    sd = _unwrap(sd)
    return {k: v for k, v in sd.items() if not (k.startswith("decoder") or k == "mask_token")}


def from_mocov3(sd: Mapping, *, keep_head: bool = False) -> dict[str, Tensor]:
    """MoCo v3 (facebookresearch/moco-v3) -> timm: keep ``[module.]base_encoder.*`` without
    the prefix; its ``head.*`` is the projection MLP and is dropped unless ``keep_head``."""
    sd = _unwrap(sd)
    out = {}
    for k, v in sd.items():
        m = re.match(r"(?:module\.)?base_encoder\.(.*)", k)
        if m is None:
            continue
        name = m.group(1)
        if name.startswith("head.") and not keep_head:
            continue
        out[name] = v
    return out


def from_dinov2(sd: Mapping) -> dict[str, Tensor]:
    """DINOv2 (facebookresearch/dinov2) -> timm, as timm's ``_convert_dinov2``: drop
    ``mask_token``; with registers, fold ``pos_embed[:, 0]`` into ``cls_token`` and keep
    patch positions only (timm's ``no_embed_class=True, reg_tokens=4``); SwiGLU
    ``w12``/``w3`` -> ``fc1``/``fc2``. Layer scale ``ls{1,2}.gamma`` keeps its name."""
    sd = _unwrap(sd)
    sd = {k: v for k, v in sd.items() if k != "mask_token"}
    out: dict[str, Tensor] = {}
    if "register_tokens" in sd:
        out["reg_token"] = sd.pop("register_tokens")
        out["cls_token"] = sd.pop("cls_token") + sd["pos_embed"][:, 0]
        out["pos_embed"] = sd.pop("pos_embed")[:, 1:]
    for k, v in sd.items():
        out[k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")] = v
    return out


_CONVERTERS = {"timm": lambda sd: {k.removeprefix("module."): v for k, v in _unwrap(sd).items()},
               "mae": from_mae, "mocov3": from_mocov3, "dinov2": from_dinov2}


def to_timm(sd: Mapping, layout: str = "auto") -> dict[str, Tensor]:
    """Convert a checkpoint of a known layout (or ``"auto"``-detected) to timm's."""
    layout = detect_layout(sd) if layout == "auto" else layout
    if layout not in _CONVERTERS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; choose from {sorted(_CONVERTERS)} or 'auto'")
    return _CONVERTERS[layout](sd)


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a checkpoint safely: ``.safetensors`` with safetensors, anything else with
    ``torch.load(weights_only=True)`` (refuses pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError and friends
        raise ValueError(
            f"refusing to load {path}: it is not a plain tensor checkpoint ({type(e).__name__}: {e}). "
            "Save it as safetensors or as a dict of tensors."
        ) from e
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


def load_dense_into_moe(
    model: nn.Module, dense_sd: Mapping[str, Tensor], *, layout: str = "auto", noise: float = 0.0, seed: int = 0,
    skip: tuple[str, ...] = (), shared_init: str = "copy",
) -> None:
    """Load a dense ViT checkpoint into a (MoE) :class:`VisionTransformer`, upcycling the MLPs
    of its MoE blocks; routers stay freshly initialised. Keys starting with a ``skip`` prefix
    (e.g. ``"head."`` to fine-tune on new classes) are neither loaded nor required. Raises on
    any other mismatch, naming the tensors. ``shared_init="zero_routed"`` with a shared expert
    starts the MoE exactly as the dense model (:func:`visionmoe.moe.upcycle_mlp_state_dict`)."""
    sd = to_timm(dense_sd, layout)
    if skip:
        sd = {k: v for k, v in sd.items() if not k.startswith(skip)}
    moe_blocks = getattr(model, "moe_blocks", [])
    shared = bool(getattr(model, "moe_config", None) and model.moe_config.shared_expert)
    num_experts = model.moe_config.num_experts if moe_blocks else 0
    if moe_blocks:
        gated = any(getattr(m, "gated", False) for m in model.modules())  # GLU experts: GLU dense MLPs
        sd = upcycle_state_dict(sd, moe_blocks, num_experts, noise=noise, seed=seed, shared_expert=shared,
                                shared_init=shared_init, num_shared=model.moe_config.num_shared_experts, gated=gated)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if ".mlp.router." not in k and not (skip and k.startswith(skip))]
    if missing or unexpected:
        raise ValueError(
            "checkpoint does not match the model: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
