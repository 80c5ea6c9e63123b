"""Vision Transformer with optional MoE blocks, built on timm's ``VisionTransformer``.

The ViT is timm's (PatchEmbed, Attention, Mlp, LayerScale, DropPath, and timm's
state-dict keys); the MoE layers are injected as the ``mlp`` of the blocks a placement
policy picks. The backbone itself knows nothing about routing:
everything MoE-specific is read from its MoE layers' typed results.

Axis legend: B images, T tokens (prefix + patches), D width, E experts, K top-k.
"""

from __future__ import annotations

from contextlib import nullcontext as _nullcontext
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer as _TimmViT
from torch import Tensor, nn

from ..moe.config import MoEConfig, build_moe
from ..moe.layer import MoE, MoEResult, routing_key
from ..moe.placement import resolve_placement
from ..moe.routers import ClusterRouter
from ..moe.upcycle import dense_mlp_shape, extract_expert_state_dict

__all__ = ["VisionTransformer"]


class VisionTransformer(_TimmViT):
    """timm ViT whose chosen blocks hold :class:`~visionmoe.moe.MoE` layers.

    Args:
        moe: :class:`~visionmoe.moe.MoEConfig` (or a dict of its fields); None = dense.
        **kwargs: any argument of timm's ``VisionTransformer`` (img_size, patch_size,
            embed_dim, depth, num_heads, mlp_ratio, num_classes, in_chans, init_values,
            reg_tokens, no_embed_class, global_pool, drop_path_rate, ...).
    """

    def __init__(self, *, moe: MoEConfig | dict | None = None, **kwargs: Any) -> None:
        img, patch = kwargs.get("img_size", 224), kwargs.get("patch_size", 16)
        img = (img, img) if isinstance(img, int) else tuple(img)
        patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        if not kwargs.get("dynamic_img_size") and any(i % p for i, p in zip(img, patch)):
            raise ValueError(f"img_size {img} is not a multiple of patch_size {patch}: the last "
                             f"{[i % p for i, p in zip(img, patch)]} pixels would be dropped; use img_size "
                             f"{tuple(i // p * p for i, p in zip(img, patch))} or resize the images")
        super().__init__(**kwargs)
        self.init_kwargs = dict(kwargs)
        self.moe_config = MoEConfig.from_dict(moe) if moe is not None else None
        if self.moe_config is not None and self.moe_config.routing == "cls" and self.cls_token is None:
            raise ValueError("moe.routing='cls' routes each image by its class token, but this ViT has none "
                             "(class_token=False); use moe.routing='mean' (the mean token)")
        depth = len(self.blocks)
        self.moe_blocks: list[int] = (
            resolve_placement(self.moe_config.placement, depth) if self.moe_config is not None else []
        )
        for i in self.moe_blocks:  # experts compute what the block's MLP computes (GLU / SwiGLU too)
            shape = dense_mlp_shape(self.blocks[i].mlp)
            self.blocks[i].mlp = build_moe(shape["dim"], shape["hidden"], self.moe_config, act_layer=shape["act"],
                                           bias=shape["bias"], drop=shape["drop"], gated=shape["gated"],
                                           gate_last=shape["gate_last"])

    # ------------------------------------------------------------------ forward
    def forward_features(self, x: Tensor, routing_key: Tensor | None = None, **kwargs) -> Tensor:
        """``(B, C, H, W) -> (B, T, D)`` normed tokens; ``routing_key`` = cluster/task ids."""
        self._check_input(x)
        if routing_key is None:
            return super().forward_features(x, **kwargs)
        with _routing_key(self, routing_key):
            return super().forward_features(x, **kwargs)

    def forward_tokens(self, x: Tensor, routing_key: Tensor | None = None) -> Tensor:
        """All output tokens ``(B, T, D)`` (prefix tokens first), for dense objectives."""
        return self.forward_features(x, routing_key=routing_key)

    def forward_visible(self, x: Tensor, ids_keep: Tensor, routing_key: Tensor | None = None) -> Tensor:
        """Encode only the patches ``ids_keep`` (MAE): ``(B, C, H, W), (B, K) -> (B, P + K, D)``
        normed tokens, P prefix tokens (CLS, registers) first. Positions are added before
        the patches are dropped, as in MAE."""
        self._check_input(x)
        with _routing_key(self, routing_key) if routing_key is not None else _nullcontext():
            t = self._pos_embed(self.patch_embed(x))  # (B, P + N, D)
            p = self.num_prefix_tokens
            patches = t[:, p:]
            idx = ids_keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1])  # (B, K, D)
            t = torch.cat([t[:, :p], torch.gather(patches, 1, idx)], dim=1)
            t = self.norm_pre(t)
            t = self.blocks(t)
            return self.norm(t)

    def _check_input(self, x: Tensor) -> None:
        pe = self.patch_embed
        want_c = pe.proj.in_channels
        size_ok = getattr(pe, "dynamic_img_size", False) or not getattr(pe, "strict_img_size", True) or (
            pe.img_size is None or tuple(x.shape[-2:]) == tuple(pe.img_size))
        if x.dim() != 4 or x.shape[1] != want_c or not size_ok:
            h, w = pe.img_size if pe.img_size is not None else ("H", "W")
            raise ValueError(
                f"expected images of shape (B, {want_c}, {h}, {w}), got {tuple(x.shape)}; convert them with "
                f"visionmoe.data.adapt(x, channels={want_c}, size={h})")

    def forward(self, x: Tensor, routing_key: Tensor | None = None, **kwargs) -> Tensor:
        """``(B, C, H, W) -> (B, num_classes)`` logits."""
        return self.forward_head(self.forward_features(x, routing_key=routing_key, **kwargs))

    # ------------------------------------------------------------------ MoE API
    @property
    def is_moe(self) -> bool:
        return bool(self.moe_blocks)

    def moe_layers(self) -> list[tuple[int, MoE]]:
        """``(block index, MoE layer)`` pairs."""
        return [(i, self.blocks[i].mlp) for i in self.moe_blocks]

    def routing(self) -> dict[int, MoEResult]:
        """Typed routing records of the last forward, by block index."""
        return {i: m.last for i, m in self.moe_layers() if m.last is not None}

    def moe_aux_loss(self) -> Tensor:
        """Sum over MoE layers of their weighted auxiliary losses (last forward)."""
        losses = [r.aux_loss.float() for r in self.routing().values()]
        if not losses:
            return self.patch_embed.proj.weight.new_zeros((), dtype=torch.float32)
        return torch.stack(losses).sum()

    def routing_stats(self) -> dict[str, dict]:
        """Per-layer plain-Python routing statistics of the last forward."""
        return {f"blocks.{i}": r.stats() for i, r in self.routing().items()}

    # ------------------------------------------------------------------ deployment
    @torch.no_grad()
    def expert_selection(self, key: int) -> dict[int, tuple[int, float]]:
        """The (expert, combine weight) each keyed (cluster/task) K=1 MoE layer gives ``key``."""
        selection = {}
        for i, m in self.moe_layers():
            if not isinstance(m.router, ClusterRouter):
                raise ValueError(
                    f"block {i} routes by {m.router.level} content, not by a cluster/task key: "
                    "pass an explicit selection={block: expert}"
                )
            if m.router.k != 1:
                raise ValueError(f"block {i} has top_k={m.router.k}; a dense model needs K=1")
            was = m.router.training
            m.router.eval()
            out = m.router(torch.zeros(1, 1, self.embed_dim), torch.tensor([key]))
            m.router.train(was)
            selection[i] = (int(out.indices[0, 0]), float(out.weights[0, 0]))
        return selection

    def extract_dense(
        self, *, key: int | None = None, selection: dict[int, int | tuple[int, float]] | None = None
    ) -> VisionTransformer:
        """A plain dense ViT holding one expert per MoE block (MoCE deployment).

        Give ``key`` (a cluster or task id; the experts and weights its router picks are
        used, so outputs match the MoE exactly for images of that key) or an explicit
        ``selection={block: expert or (expert, scale)}``.
        """
        if (key is None) == (selection is None):
            raise ValueError("pass exactly one of key= or selection=")
        if selection is None:
            selection = self.expert_selection(key)
        hidden = {m.experts.hidden for _, m in self.moe_layers()}
        dense_hidden = int(self.embed_dim * self.init_kwargs.get("mlp_ratio", 4.0))
        if hidden and hidden != {dense_hidden}:
            raise ValueError(f"experts have hidden width {hidden} != the dense MLP's {dense_hidden}")
        dense = VisionTransformer(**self.init_kwargs)
        sd = extract_expert_state_dict(self.state_dict(), selection)
        dense.load_state_dict(sd)
        return dense.to(self.patch_embed.proj.weight.device)


_routing_key = routing_key


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total parameters and parameters active per token (K of E experts in each MoE layer;
    with expert choice the mean number of experts a token gets, ``capacity_factor``; Soft MoE:
    all). With expert parallelism the experts on other ranks count too (the whole model)."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0.0
    for m in model.modules():
        if isinstance(m, MoE):
            per_expert = sum(p[0].numel() for p in m.experts.parameters())
            total += (m.num_experts - m.experts.num_local_experts) * per_expert  # held by other ranks
            router = m.router.base
            per_token = (min(m.num_experts, router.capacity_factor)
                         if getattr(router, "selection", "topk") == "expert_choice" else m.k)
            inactive += (m.num_experts - per_token) * per_expert
    return {"total": total, "active": total - round(inactive)}
