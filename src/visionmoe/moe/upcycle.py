"""Dense <-> MoE weight mappings (pure ``state_dict -> state_dict`` functions) and ``moeify``.

Key layout: a dense timm MLP at ``<p>fc1.weight (H, D)``, ``<p>fc1.bias (H,)``,
``<p>fc2.weight (D, H)``, ``<p>fc2.bias (D,)`` becomes ``<p>experts.fc1_weight (E, H, D)``,
``<p>experts.fc1_bias (E, H)``, ``<p>experts.fc2_weight (E, D, H)``,
``<p>experts.fc2_bias (E, D)``; the router (``<p>router.*``) is freshly initialised and
an optional shared expert is ``<p>shared_expert.fc{1,2}.*``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .config import MoEConfig, build_moe, expert_width, shared_width
from .layer import MoE
from .placement import resolve_placement

__all__ = [
    "upcycle_mlp_state_dict",
    "upcycle_state_dict",
    "extract_expert_state_dict",
    "moeify",
    "mlp_blocks",
    "ChannelsFirst",
]

SHARED_INITS = ("copy", "zero_routed")
_FC = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
_EXPERT = ("experts.fc1_weight", "experts.fc1_bias", "experts.fc2_weight", "experts.fc2_bias")


def upcycle_mlp_state_dict(
    mlp: Mapping[str, Tensor],
    num_experts: int,
    *,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
    shared_expert: bool = False,
    shared_init: str = "copy",
    num_shared: int = 1,
    gated: bool = False,
) -> dict[str, Tensor]:
    """Copy one dense MLP (keys ``fc1.weight``... relative to the MLP; timm ``SwiGLU``'s
    ``fc1_x`` / ``fc1_g`` are packed by :func:`pack_swiglu`) into E experts.

    Args:
        mlp: the dense MLP's state dict.
        num_experts: E.
        noise: relative perturbation: expert e gets ``w + noise * std(w) * N(0, 1)`` for each
            weight matrix (biases are copied), so experts can diverge (MoCE). 0 = exact copies.
        generator: random generator for the perturbation.
        shared_expert: also copy the MLP into ``shared_expert.*`` (ViMoE).
        shared_init: with a shared expert, ``"copy"`` (every expert and the shared expert are
            the dense MLP: the layer starts as ``dense + sum_k w_k dense``) or ``"zero_routed"``
            (the routed experts' output layer starts at zero: the layer starts *exactly* as the
            dense MLP, and the experts' ``fc2`` learns first).
        num_shared: shared experts (one MLP of ``num_shared`` x the hidden width): ``num_shared``
            copies of the dense MLP whose fc2 is divided by ``num_shared``, still the dense MLP;
            ``gated``: a GLU MLP, whose fc1 halves ``[x; gate]`` are each repeated.
    """
    if shared_init not in SHARED_INITS:
        raise ValueError(f"shared_init must be one of {list(SHARED_INITS)}, got {shared_init!r}")
    mlp = pack_swiglu(mlp)
    missing = [k for k in ("fc1.weight", "fc2.weight") if k not in mlp]
    if missing:
        raise KeyError(f"dense MLP state dict lacks {missing}; got keys {sorted(mlp)}")
    extra = sorted(k for k in mlp if k not in _FC)
    if extra:
        raise ValueError(f"cannot upcycle an MLP with extra parameters {extra} (only fc1/fc2 MLPs are supported)")
    out: dict[str, Tensor] = {}
    for src, dst in zip(_FC, _EXPERT):
        if src not in mlp:
            continue
        w = mlp[src]
        stacked = w.unsqueeze(0).repeat(num_experts, *([1] * w.dim())).clone()
        if noise > 0 and w.dim() == 2:
            eps = torch.randn(stacked.shape, generator=generator, dtype=torch.float32).to(w.dtype)
            stacked = stacked + noise * w.float().std().to(w.dtype) * eps
        if shared_expert and shared_init == "zero_routed" and src.startswith("fc2"):
            stacked = torch.zeros_like(stacked)
        out[dst] = stacked
        if shared_expert:
            out[f"shared_expert.{src}"] = _shared_copies(w, src, num_shared, gated)
    return out


def _shared_copies(w: Tensor, name: str, n: int, gated: bool) -> Tensor:
    """One dense MLP tensor as ``n`` shared experts that sum to the dense MLP: fc1 rows
    repeated (a GLU's halves each repeated, so they stay ``[x...; gate...]``), fc2 columns
    repeated and divided by ``n``; fc2's bias once."""
    if n == 1 or name == "fc2.bias":
        return w.clone()
    if name == "fc2.weight":
        return w.repeat(1, n) / n
    halves = w.chunk(2) if gated else (w,)
    return torch.cat([h.repeat(n, *([1] * (h.dim() - 1))) for h in halves])


def upcycle_state_dict(
    state_dict: Mapping[str, Tensor],
    blocks: Sequence[int],
    num_experts: int,
    *,
    prefix: str = "blocks.{}.mlp.",
    noise: float = 0.0,
    seed: int = 0,
    shared_expert: bool = False,
    shared_init: str = "copy",
    num_shared: int = 1,
    gated: bool = False,
) -> dict[str, Tensor]:
    """Turn the dense MLPs of the given blocks of a dense state dict into experts
    (``shared_init``, ``num_shared``, ``gated``: see :func:`upcycle_mlp_state_dict`).

    Returns a new state dict; every other key is passed through unchanged. Router
    weights are not produced (they start fresh): load with ``strict=False`` or through
    :func:`visionmoe.models.load_dense_into_moe`, which checks that only router keys are missing.
    """
    g = torch.Generator().manual_seed(seed)
    out = dict(state_dict)
    for i in blocks:
        p = prefix.format(i)
        mlp = {k[len(p):]: v for k, v in state_dict.items() if k.startswith(p)}
        if not mlp:
            raise KeyError(f"no dense MLP weights under {p!r} in the state dict")
        for k in mlp:
            out.pop(p + k)
        up = upcycle_mlp_state_dict(mlp, num_experts, noise=noise, generator=g, shared_expert=shared_expert,
                                    shared_init=shared_init, num_shared=num_shared, gated=gated)
        out.update({p + k: v for k, v in up.items()})
    return out


def extract_expert_state_dict(
    state_dict: Mapping[str, Tensor],
    selection: Mapping[int, int | tuple[int, float]],
    *,
    prefix: str = "blocks.{}.mlp.",
) -> dict[str, Tensor]:
    """Extract a dense state dict that keeps one expert per MoE block.

    Args:
        state_dict: a MoE model's state dict.
        selection: ``{block: expert}`` or ``{block: (expert, scale)}``; ``scale`` is the
            combine weight the router gives that expert (folded into fc2), e.g. the
            constant weight a cluster- or task-conditional K=1 router assigns.
        prefix: where block i's MLP lives.

    Returns:
        A dense (timm layout) state dict: ``<p>fc1.weight`` = expert's, ``<p>fc2.*`` scaled.
    """
    out = dict(state_dict)
    pattern = re.compile(re.escape(prefix).replace(r"\{\}", r"(\d+)") + r"experts\.fc1_weight")
    moe_blocks = sorted({int(m.group(1)) for k in state_dict if (m := pattern.fullmatch(k))})
    unselected = [b for b in moe_blocks if b not in selection]
    if unselected:
        raise ValueError(f"MoE blocks {unselected} have no selected expert; pass selection={{block: expert}}")
    for block, choice in selection.items():
        e, scale = (choice, 1.0) if isinstance(choice, int) else (int(choice[0]), float(choice[1]))
        p = prefix.format(block)
        if p + "experts.fc1_weight" not in state_dict:
            raise KeyError(f"block {block} has no experts (no key {p}experts.fc1_weight)")
        if any(k.startswith(p + "shared_expert.") for k in state_dict):
            raise ValueError(
                f"block {block} has a shared expert: a dense MLP of the same width cannot hold "
                "shared + routed expert; extract without a shared expert"
            )
        n = state_dict[p + "experts.fc1_weight"].shape[0]
        if not 0 <= e < n:
            raise ValueError(f"expert {e} out of range for block {block} with {n} experts")
        for k in [k for k in out if k.startswith(p + "experts.") or k.startswith(p + "router.")]:
            out.pop(k)
        for dense_key, moe_key in zip(_FC, _EXPERT):
            if p + moe_key not in state_dict:
                continue
            v = state_dict[p + moe_key][e].clone()
            out[p + dense_key] = v * scale if dense_key.startswith("fc2") else v
    return out


class ChannelsFirst(nn.Module):
    """Run a channels-last MoE on channels-first ``(B, C, H, W)`` tensors (for 1x1-conv
    MLPs such as timm ConvNeXt's ``conv_mlp=True`` blocks)."""

    def __init__(self, moe: MoE) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x: Tensor) -> Tensor:
        return self.moe(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def mlp_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` of every module that holds a dense or MoE ``.mlp``, in order.

    That covers timm's ViT / DeiT / DINOv2 / Swin blocks and ConvNeXt blocks (whose
    ``mlp`` acts on channels-last ``(B, H, W, C)`` tensors, or is made of 1x1 convs).
    """
    out = []
    for name, m in model.named_modules():
        mlp = getattr(m, "mlp", None)
        if isinstance(mlp, (MoE, ChannelsFirst)) or (isinstance(mlp, nn.Module) and _mlp_kind(mlp)):
            out.append((name, m))
    return out


def dense_mlp_shape(mlp: nn.Module) -> dict[str, Any]:
    """What a MoE replacing the dense ``mlp`` needs to compute the same function: ``{"dim",
    "hidden", "gated", "gate_last", "act", "bias", "drop"}`` for timm's ``Mlp``, ``GluMlp`` /
    ``SwiGLUPacked`` (fc1 of 2H outputs, halves gated) and ``SwiGLU`` (``fc1_g``, ``fc1_x``);
    refuses MLPs with an inner norm layer."""
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        raise ValueError(f"{type(mlp).__name__} has an inner norm layer (e.g. EVA-02 with scale_mlp); MoE experts "
                         "do not support it: build the model without it (scale_mlp=False)")
    act = copy.deepcopy(getattr(mlp, "act", nn.GELU()))
    drop = getattr(getattr(mlp, "drop1", None), "p", 0.0)
    if _mlp_kind(mlp) == "swiglu":
        return dict(dim=mlp.fc1_x.in_features, hidden=mlp.fc1_x.out_features, gated=True, gate_last=True, act=act,
                    bias=mlp.fc1_x.bias is not None, drop=drop)
    fc1 = mlp.fc1
    gated = hasattr(mlp, "gate_last") and hasattr(mlp, "chunk_dim")  # timm's GluMlp family
    return dict(dim=fc1.weight.shape[1], hidden=fc1.weight.shape[0] // (2 if gated else 1), gated=gated,
                gate_last=bool(getattr(mlp, "gate_last", True)), act=act, bias=fc1.bias is not None, drop=drop)


def pack_swiglu(mlp: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A dense MLP state dict with timm ``SwiGLU``'s separate ``fc1_x`` / ``fc1_g`` packed into
    one ``fc1`` of ``[x; gate]`` rows (the GLU experts' ``gate_last`` layout: ``x * act(gate)``,
    the function ``SwiGLU`` computes); any other state dict is returned as it is."""
    if "fc1_x.weight" not in mlp or "fc1_g.weight" not in mlp:
        return dict(mlp)
    out = {k: v for k, v in mlp.items() if not k.startswith(("fc1_x.", "fc1_g."))}
    out["fc1.weight"] = torch.cat([mlp["fc1_x.weight"], mlp["fc1_g.weight"]])
    if "fc1_x.bias" in mlp:
        out["fc1.bias"] = torch.cat([mlp["fc1_x.bias"], mlp["fc1_g.bias"]])
    return out


def _dense_fc_state(mlp: nn.Module) -> dict[str, Tensor]:
    """The dense MLP's fc1/fc2 tensors in the experts' layout (SwiGLU's fc1_x and fc1_g packed
    as ``[x; gate]``, i.e. ``gate_last``; 1x1 conv weights flattened to linear ones)."""
    sd = pack_swiglu(mlp.state_dict())
    return {k: v.flatten(1) if v.dim() == 4 else v for k, v in sd.items() if k in _FC}


def _mlp_kind(mlp: nn.Module) -> str | None:
    fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
    if isinstance(getattr(mlp, "fc1_g", None), nn.Linear) and isinstance(getattr(mlp, "fc1_x", None), nn.Linear):
        return "swiglu"
    if isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear):
        return "linear"
    if isinstance(fc1, nn.Conv2d) and isinstance(fc2, nn.Conv2d) and fc1.kernel_size == fc2.kernel_size == (1, 1):
        return "conv1x1"
    return None


def _resolve_stage(placement: Any, blocks: list[tuple[str, nn.Module]]) -> list[int] | None:
    """``"stage_<i>"``: every MLP block of stage ``i`` of a hierarchical model (timm's
    ``stages.<i>.`` module names, e.g. ConvNeXt / Swin); None for other policies."""
    if not (isinstance(placement, str) and placement.startswith("stage_")):
        return None
    stage = placement.removeprefix("stage_")
    chosen = [i for i, (name, _) in enumerate(blocks) if name.startswith(f"stages.{stage}.")]
    if not chosen:
        stages = sorted({n.split(".")[1] for n, _ in blocks if n.startswith("stages.")})
        raise ValueError(f"placement {placement!r}: no MLP blocks in stage {stage}; "
                         f"this model's stages: {stages or 'none (not a hierarchical model)'}")
    return chosen


def _stages(blocks: list[tuple[str, nn.Module]]) -> dict[str, list[int]]:
    """Block indices per stage of a hierarchical model (timm's ``stages.<i>.`` names), in order."""
    out: dict[str, list[int]] = {}
    for i, (name, _) in enumerate(blocks):
        if name.startswith("stages."):
            out.setdefault(name.split(".")[1], []).append(i)
    return out


def _resolve_hierarchical(placement: Any, blocks: list[tuple[str, nn.Module]]) -> list[int] | None:
    """The Sweet-spot paper's placements on a hierarchical model (ConvNeXt, Swin: two or more
    stages): ``"stage"`` = the last block of every stage, ``"last_{n}"`` = the last block of
    each of the last n stages ("Last 2"). None for other policies or single-stage models."""
    stages = _stages(blocks)
    if len(stages) < 2 or not isinstance(placement, str):
        return None
    last = [idx[-1] for idx in stages.values()]
    if placement == "stage":
        return last
    m = re.fullmatch(r"last_(\d+)", placement)
    if m is None:
        return None
    n = int(m.group(1))
    if not 0 <= n <= len(last):
        raise ValueError(f"placement {placement!r}: this model has {len(last)} stages; on a hierarchical model "
                         f"last_n takes the last block of each of the last n stages (n <= {len(last)})")
    return last[len(last) - n:]


def moeify(
    model: nn.Module,
    *,
    placement: Any = "every_2",
    num_experts: int = 8,
    top_k: int = 1,
    noise: float = 0.0,
    seed: int = 0,
    placement_scores: Sequence[float] | None = None,
    shared_init: str = "copy",
    **moe_kwargs: Any,
) -> nn.Module:
    """Upcycle chosen dense MLPs of any timm-style model into token- or image-routed MoEs.

    Works on every model whose blocks hold an ``mlp`` with ``fc1``/``fc2`` linear layers
    (timm ViT, DeiT, DINOv2, Swin, ConvNeXt with ``conv_mlp=False``...). Each expert starts
    as a copy of the dense MLP (plus ``noise``, see :func:`upcycle_mlp_state_dict`); the
    router is new. Modifies ``model`` in place and returns it.

    Args:
        model: the dense model.
        placement: placement policy over the model's MLP blocks, in module order.
        num_experts, top_k: E and K.
        noise: relative expert perturbation.
        expert widths: ``expert_hidden`` (units) or ``expert_ratio`` (times each layer's width,
            e.g. the Sweet-spot ConvNeXt's ratio-2 experts); experts of another width than the
            dense MLP cannot copy it and start from a fresh initialisation.
        placement on hierarchical models (two or more ``stages``): ``"stage"`` = the last block
            of every stage, ``"last_{n}"`` = the last block of each of the last n stages (the
            Sweet-spot paper's "Stage" and "Last 2"), ``"stage_<i>"`` = every block of stage i;
            ``every_n`` counts blocks across stages.
        shared_init: with ``shared_expert=True``: ``"copy"`` or ``"zero_routed"`` (the model
            then starts exactly as the dense one; :func:`upcycle_mlp_state_dict`).
        placement_scores: per-MLP-block scores for ``placement="by_gradient_magnitude[_n]"``
            (e.g. :func:`visionmoe.analysis.gradient_magnitude_scores` of the dense model).
        **moe_kwargs: any other :class:`~visionmoe.moe.config.MoEConfig` field
            (``router``, ``routing``, ``capacity_factor``, ``shared_expert``...).
    """
    cfg = MoEConfig.from_dict(dict(num_experts=num_experts, top_k=top_k, placement=placement, **moe_kwargs))
    if cfg.routing == "cls" and getattr(model, "cls_token", None) is None:
        raise ValueError(f"routing='cls' routes each image by its class token, but {type(model).__name__} has none "
                         "(Swin, ConvNeXt, class_token=False); use routing='mean' (the mean token)")
    blocks = mlp_blocks(model)
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} has no blocks with an `mlp` made of fc1/fc2 linear or 1x1-conv layers; "
            "moeify supports timm ViT/DeiT/DINOv2/Swin/ConvNeXt (conv_mlp=False) style models"
        )
    chosen = _resolve_stage(cfg.placement, blocks)
    if chosen is None:
        chosen = _resolve_hierarchical(cfg.placement, blocks)
    if chosen is None:
        chosen = resolve_placement(cfg.placement, len(blocks), scores=placement_scores)
    g = torch.Generator().manual_seed(seed)
    for i in chosen:
        name, block = blocks[i]
        dense = block.mlp
        if isinstance(dense, (MoE, ChannelsFirst)):
            raise ValueError(f"block {name or i} already holds a MoE layer")
        kind = _mlp_kind(dense)
        shape = dense_mlp_shape(dense)
        in_features, hidden = shape["dim"], shape["hidden"]
        layer = build_moe(in_features, hidden, cfg, act_layer=shape["act"], bias=shape["bias"],
                          drop=shape["drop"], gated=shape["gated"], gate_last=shape["gate_last"])
        up = upcycle_mlp_state_dict(_dense_fc_state(dense), cfg.num_experts, noise=noise, generator=g,
                                    shared_expert=cfg.shared_expert, shared_init=shared_init,
                                    num_shared=cfg.num_shared_experts, gated=shape["gated"])
        if expert_width(cfg, in_features, hidden) != hidden:  # experts of another width start fresh;
            up = {k: v for k, v in up.items() if k.startswith("shared_expert.")}  # the shared one is the MLP
        if cfg.shared_expert and shared_width(cfg, in_features, hidden) != hidden:  # ... unless it is narrower too
            up = {k: v for k, v in up.items() if not k.startswith("shared_expert.")}
        _, unexpected = layer.load_state_dict(up, strict=False)
        assert not unexpected, unexpected
        ref = next(dense.parameters())
        layer.to(device=ref.device, dtype=ref.dtype)
        block.mlp = ChannelsFirst(layer) if kind == "conv1x1" else layer
    return model
