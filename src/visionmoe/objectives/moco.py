"""MoCo v3 (Chen, Xie and He 2021, facebookresearch/moco-v3) for ViT and ViT-MoE, with
CR-MoE's OGAR routing-consistency losses (Chen et al., TMLR 2024).

Two augmented views of every image; the base encoder + 3-layer projector + 2-layer
predictor gives queries, a momentum copy of encoder + projector gives keys; the loss is the
symmetric InfoNCE ``ctr(q1, k2) + ctr(q2, k1)`` with temperature T scaled by ``2T``.

Every view records its crop ``[x, y, w, h, flipped]`` in source coordinates (fractions of the
source image), so every patch of a view has a box in the source image; patches of the two
views are matched by IoU (argmax above ``lambda``). OGAR adds, per MoE layer, an InfoNCE
between the gate-probability vectors of the two views' CLS tokens and an InfoNCE between the
gate vectors of matched patches (negatives: the same patch position in the other images):
``w_G * ((1 - alpha) * cls + alpha * patch)``.

Axis legend: B images, N patches, G patches per side, E experts, D width.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Objective, register_objective

__all__ = [
    "crop_with_geometry",
    "TwoViewAugment",
    "patch_boxes",
    "match_patches",
    "gate_infonce",
    "ogar_loss",
    "moco_momentum",
    "MoCoObjective",
]


# ------------------------------------------------------------------ views that know their geometry
def crop_with_geometry(img: Tensor, top: int, left: int, height: int, width: int, size: int,
                       flip: bool) -> tuple[Tensor, Tensor]:
    """Crop ``img`` ``(C, H, W)`` at ``(top, left, height, width)``, resize to ``size`` (bilinear,
    antialiased), optionally flip horizontally; returns the view and its geometry
    ``[x, y, w, h, flipped]`` as fractions of the source width / height."""
    from torchvision.transforms.v2 import functional as TF

    view = TF.resized_crop(img, top, left, height, width, [size, size], antialias=True)
    if flip:
        view = view.flip(-1)
    h_src, w_src = img.shape[-2:]
    geom = torch.tensor([left / w_src, top / h_src, width / w_src, height / h_src, float(flip)])
    return view, geom


class TwoViewAugment:
    """MoCo v3's asymmetric pair of augmentations (BYOL's), on image tensors in [0, 1]:
    random resized crop (recorded), flip (recorded), colour jitter 0.4/0.4/0.2/0.1 (p 0.8),
    grayscale (p 0.2), Gaussian blur (p 1.0 / 0.1), solarise (p 0 / 0.2). Greyscale inputs
    skip the colour-only steps. ``__call__((B, C, H, W)) -> (v1, g1, v2, g2)``."""

    def __init__(self, size: int, *, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: float = 0.5, jitter: float = 0.8,
                 grayscale: float = 0.2, blur: tuple[float, float] = (1.0, 0.1),
                 solarize: tuple[float, float] = (0.0, 0.2)) -> None:
        self.size, self.scale, self.ratio, self.flip = size, scale, ratio, flip
        self.jitter, self.grayscale, self.blur, self.solarize = jitter, grayscale, blur, solarize

    def _one(self, img: Tensor, view: int) -> tuple[Tensor, Tensor]:
        from torchvision.transforms import v2

        top, left, h, w = v2.RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        out, geom = crop_with_geometry(img, top, left, h, w, self.size, bool(torch.rand(()) < self.flip))
        rgb = out.shape[0] == 3
        if torch.rand(()) < self.jitter:
            out = v2.ColorJitter(0.4, 0.4, 0.2 if rgb else 0.0, 0.1 if rgb else 0.0)(out)
        if rgb and torch.rand(()) < self.grayscale:
            out = v2.Grayscale(3)(out)
        if torch.rand(()) < self.blur[view]:
            k = max(3, (self.size // 10) | 1)  # odd kernel ~10% of the view, as in SimCLR
            out = v2.GaussianBlur(k, sigma=(0.1, 2.0))(out)
        if torch.rand(()) < self.solarize[view]:
            out = torch.where(out >= 0.5, 1.0 - out, out)
        return out.clamp(0, 1), geom

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        v1, g1 = zip(*(self._one(img, 0) for img in x))
        v2, g2 = zip(*(self._one(img, 1) for img in x))
        dev = x.device  # the geometry is built on the CPU from Python numbers
        return torch.stack(v1), torch.stack(g1).to(dev), torch.stack(v2), torch.stack(g2).to(dev)


def patch_boxes(geom: Tensor, grid: int) -> Tensor:
    """``(B, 5)`` crop geometries -> ``(B, G*G, 4)`` boxes ``[x0, y0, x1, y1]`` of every patch
    (row-major, as the ViT orders them) in source-image fractions. In a flipped view the
    patch in column ``c`` shows the source columns of ``G - 1 - c``."""
    x, y, w, h, flipped = geom.unbind(-1)  # (B,) each
    edges = torch.arange(grid + 1, dtype=geom.dtype, device=geom.device) / grid  # (G+1,)
    u0, u1 = edges[:-1], edges[1:]  # (G,) view fractions of each column / row
    fl = flipped[:, None] > 0.5
    cu0 = torch.where(fl, 1 - u1, u0)  # (B, G) crop fractions of each view column
    cu1 = torch.where(fl, 1 - u0, u1)
    x0 = x[:, None] + cu0 * w[:, None]  # (B, G)
    x1 = x[:, None] + cu1 * w[:, None]
    y0 = y[:, None] + u0 * h[:, None]
    y1 = y[:, None] + u1 * h[:, None]
    b = len(geom)
    boxes = torch.stack([x0[:, None, :].expand(b, grid, grid), y0[:, :, None].expand(b, grid, grid),
                         x1[:, None, :].expand(b, grid, grid), y1[:, :, None].expand(b, grid, grid)], dim=-1)
    return boxes.reshape(b, grid * grid, 4)


def match_patches(boxes1: Tensor, boxes2: Tensor, threshold: float = 0.2) -> tuple[Tensor, Tensor]:
    """For every patch of view 1, the view-2 patch of the same image with the largest IoU, and
    whether that IoU exceeds ``threshold``: ``(idx (B, N1), valid (B, N1))``."""
    lt = torch.maximum(boxes1[:, :, None, :2], boxes2[:, None, :, :2])  # (B, N1, N2, 2)
    rb = torch.minimum(boxes1[:, :, None, 2:], boxes2[:, None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    area1 = (boxes1[..., 2:] - boxes1[..., :2]).prod(-1)  # (B, N1)
    area2 = (boxes2[..., 2:] - boxes2[..., :2]).prod(-1)
    iou = inter / (area1[:, :, None] + area2[:, None, :] - inter).clamp_min(1e-12)
    best, idx = iou.max(dim=-1)
    return idx, best > threshold


# ------------------------------------------------------------------ losses
def gate_infonce(p: Tensor, q: Tensor, temperature: float = 0.2) -> Tensor:
    """InfoNCE between gate vectors ``p`` and ``q`` ``(B, E)``: row ``i`` of ``p`` should match
    row ``i`` of ``q`` among all rows of ``q`` (cosine similarity / T), times ``2T`` as MoCo v3."""
    logits = F.normalize(p.float(), dim=-1) @ F.normalize(q.float(), dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(len(p), device=p.device)) * 2 * temperature


def _patch_infonce(a: Tensor, b: Tensor, idx: Tensor, valid: Tensor, temperature: float) -> Tensor:
    """Anchors ``a[i, n]`` against ``b[j, idx[i, n]]`` for every image j (positive: j = i),
    averaged over *all* ``B * N`` patches as eq. 8: an unmatched patch contributes 0 (eq. 7),
    so fewer matches mean a smaller loss, not a re-weighted one."""
    if not bool(valid.any()):
        return a.new_zeros(())
    an = F.normalize(a.float(), dim=-1)
    bn = F.normalize(b.float(), dim=-1)
    ii, nn_ = valid.nonzero(as_tuple=True)  # the valid (image, patch) anchors
    anchors = an[ii, nn_]  # (P, E)
    cands = bn[:, idx[ii, nn_]]  # (B, P, E): the matched position in every image
    logits = torch.einsum("pe,bpe->pb", anchors, cands) / temperature  # (P, B)
    return F.cross_entropy(logits, ii, reduction="sum") / valid.numel() * 2 * temperature


def ogar_loss(cls1: Tensor, cls2: Tensor, patch1: Tensor, patch2: Tensor, idx12: Tensor, valid12: Tensor,
              idx21: Tensor, valid21: Tensor, *, alpha: float = 0.3, temperature: float = 0.2) -> dict[str, Tensor]:
    """OGAR for one MoE layer: ``(1 - alpha) * cls + alpha * patch`` where both terms are
    symmetric InfoNCE losses on gate probabilities (``cls*``: ``(B, E)``, ``patch*``:
    ``(B, N, E)``; ``idx12/valid12`` match view-1 patches to view 2 and ``idx21/valid21`` back)."""
    cls = gate_infonce(cls1, cls2, temperature) + gate_infonce(cls2, cls1, temperature)
    patch = (_patch_infonce(patch1, patch2, idx12, valid12, temperature)
             + _patch_infonce(patch2, patch1, idx21, valid21, temperature))
    return {"loss": (1 - alpha) * cls + alpha * patch, "cls": cls.detach(), "patch": patch.detach()}


def moco_momentum(step: int, total: int, base: float = 0.99) -> float:
    """MoCo v3's schedule: from ``base`` to 1 along a half cosine."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1))) * (1.0 - base)


def _mlp(num_layers: int, dim_in: int, hidden: int, dim_out: int, last_bn: bool) -> nn.Sequential:
    """MoCo v3's ``_build_mlp``: Linear (no bias) + BN + ReLU, the last BN without affine."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d1 = dim_in if i == 0 else hidden
        d2 = dim_out if i == num_layers - 1 else hidden
        layers.append(nn.Linear(d1, d2, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d2), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d2, affine=False))
    return nn.Sequential(*layers)


@register_objective("moco")
class MoCoObjective(Objective):
    """MoCo v3 on ``model`` (a ViT / ViT-MoE whose ``forward_features`` gives ``(B, 1 + N, D)``
    tokens), with optional OGAR when the model has MoE layers.

    Args:
        model: the base encoder; the momentum encoder is a copy made here.
        img_size: view size (default: the model's).
        dim, mlp_dim: projector output / hidden widths (MoCo v3: 256 / 4096).
        temperature: InfoNCE T (0.2).
        momentum: base momentum (0.99), raised to 1 by a half cosine over ``total_steps``.
        total_steps: length of the momentum schedule (the Trainer sets it when it builds this).
        ogar_weight: ``w_G`` (0.001; 0 disables OGAR); ``alpha``: patch share (0.3);
        iou_threshold: ``lambda`` (0.2); ``ogar_parts``: ``"both"``, ``"cls"`` or ``"patch"``.
        freeze_patch_embed: MoCo v3's frozen random patch projection.
        augment: keyword arguments of :class:`TwoViewAugment` (e.g. ``scale``).
    """

    def __init__(self, model: nn.Module, *, img_size: int | None = None, dim: int = 256, mlp_dim: int = 4096,
                 temperature: float = 0.2, momentum: float = 0.99, total_steps: int = 1000,
                 ogar_weight: float = 0.0, alpha: float = 0.3, iou_threshold: float = 0.2,
                 ogar_parts: str = "both", freeze_patch_embed: bool = False, augment: dict | None = None) -> None:
        super().__init__()
        if ogar_parts not in ("both", "cls", "patch"):
            raise ValueError(f"ogar_parts must be 'both', 'cls' or 'patch', got {ogar_parts!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        width = model.embed_dim
        self.projector = _mlp(3, width, mlp_dim, dim, last_bn=True)
        self.predictor = _mlp(2, dim, mlp_dim, dim, last_bn=False)
        if freeze_patch_embed:
            model.patch_embed.requires_grad_(False)
        self.momentum_encoder = copy.deepcopy(model).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.temperature, self.base_momentum, self.total_steps = temperature, momentum, total_steps
        self.ogar_weight, self.alpha, self.ogar_parts = ogar_weight, alpha, ogar_parts
        self.iou_threshold = iou_threshold
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        pe = model.patch_embed
        self.img_size = img_size or pe.img_size[0]
        self.grid = pe.grid_size[0]
        self.augment = TwoViewAugment(self.img_size, **(augment or {}))
        self._moe = [m for _, m in model.moe_layers()] if hasattr(model, "moe_layers") else []
        for m in self._moe:
            m.keep_probs = True

    @classmethod
    def from_config(cls, model, *, num_classes, total_steps, run, args):
        return cls(model, **{"total_steps": total_steps, **args})

    # ------------------------------------------------------------------ pieces
    def contrastive(self, q: Tensor, k: Tensor) -> Tensor:
        logits = F.normalize(q.float(), dim=1) @ F.normalize(k.float(), dim=1).T / self.temperature
        return F.cross_entropy(logits, torch.arange(len(q), device=q.device)) * 2 * self.temperature

    @torch.no_grad()
    def update_momentum(self, model: nn.Module, m: float) -> None:
        for src, dst in ((model, self.momentum_encoder), (self.projector, self.momentum_projector)):
            for p, pm in zip(src.parameters(), dst.parameters()):
                pm.mul_(m).add_(p.detach(), alpha=1 - m)

    def _embed(self, encoder: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """CLS features and, per MoE layer of the base encoder, its ``(B, 1 + N, E)`` gate probs."""
        tokens = encoder.forward_features(x)
        cls = tokens[:, 0]
        gates = []
        if encoder is not self.momentum_encoder:
            for m in self._moe:
                p = m.last.extra["probs"]
                gates.append(p.reshape(len(x), -1, p.shape[-1]) if m.level == "token" else p[:, None])
        return cls, gates

    def views(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.augment(x)

    def forward(self, model: nn.Module, batch, routing_key: Tensor | None = None) -> dict[str, Tensor]:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        v1, g1, v2, g2 = self.views(x)
        return self.loss(model, v1, g1, v2, g2)

    def _contrast(self, model: nn.Module, v1: Tensor, v2: Tensor):
        """Symmetric InfoNCE of the two views, the base encoder's gate probabilities of each view
        and the balance loss of view 1 (the Trainer adds view 2's, the last forward)."""
        f1, gates1 = self._embed(model, v1)
        aux1 = model.moe_aux_loss() if self._moe else None
        f2, gates2 = self._embed(model, v2)
        q1, q2 = self.predictor(self.projector(f1)), self.predictor(self.projector(f2))
        with torch.no_grad():
            k1 = self.momentum_projector(self._embed(self.momentum_encoder, v1)[0])
            k2 = self.momentum_projector(self._embed(self.momentum_encoder, v2)[0])
        return self.contrastive(q1, k2) + self.contrastive(q2, k1), gates1, gates2, aux1

    def loss(self, model: nn.Module, v1: Tensor, g1: Tensor, v2: Tensor, g2: Tensor) -> dict[str, Tensor]:
        if self.training:  # the keys come from the momentum copy of the current weights (MoCo v3)
            self.update_momentum(model, moco_momentum(int(self.step), self.total_steps, self.base_momentum))
            self.step += 1
        ctr, gates1, gates2, aux1 = self._contrast(model, v1, v2)
        out = {"loss": ctr, "ctr_loss": ctr.detach()}
        if aux1 is not None:
            out["loss"] = out["loss"] + aux1
        if self.ogar_weight and self._moe:
            og = self.ogar(gates1, gates2, g1, g2)
            out["loss"] = out["loss"] + self.ogar_weight * og["loss"]
            out.update({"ogar_loss": og["loss"].detach(), "ogar_cls": og["cls"], "ogar_patch": og["patch"]})
        return out

    def ogar(self, gates1: list[Tensor], gates2: list[Tensor], g1: Tensor, g2: Tensor) -> dict[str, Tensor]:
        """OGAR averaged over the MoE layers (token-level layers only get the patch term)."""
        b1, b2 = patch_boxes(g1, self.grid), patch_boxes(g2, self.grid)
        idx12, val12 = match_patches(b1, b2, self.iou_threshold)
        idx21, val21 = match_patches(b2, b1, self.iou_threshold)
        alpha = {"both": self.alpha, "cls": 0.0, "patch": 1.0}[self.ogar_parts]
        parts = []
        for p1, p2 in zip(gates1, gates2):
            if p1.shape[1] == 1:  # image-level routing: only the CLS-gate term exists
                parts.append(ogar_loss(p1[:, 0], p2[:, 0], p1, p2, idx12[:, :0], val12[:, :0], idx21[:, :0],
                                       val21[:, :0], alpha=0.0, temperature=self.temperature))
                continue
            prefix = p1.shape[1] - self.grid * self.grid  # CLS (+ register) tokens first
            parts.append(ogar_loss(p1[:, 0], p2[:, 0], p1[:, prefix:], p2[:, prefix:], idx12, val12, idx21, val21,
                                   alpha=alpha, temperature=self.temperature))
        return {k: torch.stack([p[k] for p in parts]).mean() for k in ("loss", "cls", "patch")}

    @torch.no_grad()
    def eval_batch(self, model: nn.Module, x: Tensor, y: Tensor, key: Tensor | None = None,
                   generator: torch.Generator | None = None) -> dict[str, float]:
        """Sum over the batch of the contrastive loss on views drawn from a fixed seed."""
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=generator)) if generator else 0)
            v1, _, v2, _ = self.views(x)
        return {"ctr_loss": float(self._contrast(model, v1, v2)[0]) * len(x)}
