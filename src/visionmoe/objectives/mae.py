"""Masked autoencoding (He et al. 2022, facebookresearch/mae ``models_mae.py``): random
masking, encoder on visible patches, a light decoder, loss on masked patches with
per-patch normalised pixel targets.

Axis legend: B images, N patches, K kept patches, p patch size, C channels, D encoder
width, Dd decoder width.
"""

from __future__ import annotations

import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from .base import Objective, register_objective

__all__ = ["random_masking", "patchify", "unpatchify", "MAEDecoder", "MAEObjective"]


def random_masking(batch: int, num_patches: int, mask_ratio: float, *, device=None,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image random masking by argsort of uniform noise (MAE).

    Returns:
        ids_keep ``(B, K)`` with ``K = int(N * (1 - mask_ratio))``, mask ``(B, N)`` with 1 for
        masked patches, ids_restore ``(B, N)`` (undoes the shuffle).
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    keep = int(num_patches * (1 - mask_ratio))
    gen_device = generator.device if generator is not None else device  # a CPU generator draws on the CPU
    noise = torch.rand(batch, num_patches, device=gen_device, generator=generator).to(device)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    ids_keep = ids_shuffle[:, :keep]
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :keep] = 0
    return ids_keep, torch.gather(mask, 1, ids_restore), ids_restore


def patchify(imgs: Tensor, p: int) -> Tensor:
    """``(B, C, H, W) -> (B, N, p*p*C)`` in MAE's order (row-major patches, (p, p, C) inside)."""
    b, c, h, w = imgs.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: Tensor, p: int, c: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`patchify`."""
    b = x.shape[0]
    x = x.reshape(b, h // p, w // p, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, h, w)


class MAEDecoder(nn.Module):
    """MAE's light decoder: embed, insert mask tokens, fixed 2-D sin-cos positions, a few
    timm ``Block``s, predict the pixels of every patch."""

    def __init__(self, *, embed_dim: int, num_patches: int, grid: tuple[int, int], patch_size: int, in_chans: int,
                 decoder_dim: int = 128, depth: int = 2, num_heads: int = 4, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        pos = build_sincos2d_pos_embed(list(grid), dim=decoder_dim).reshape(1, num_patches, decoder_dim)
        self.register_buffer("pos_embed", pos, persistent=False)
        self.blocks = nn.Sequential(*[Block(decoder_dim, num_heads, mlp_ratio=4.0, qkv_bias=True)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(decoder_dim)
        self.pred = nn.Linear(decoder_dim, patch_size * patch_size * in_chans)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, tokens: Tensor, ids_restore: Tensor) -> Tensor:
        """``tokens: (B, P + K, D)`` encoder output, ``ids_restore: (B, N)`` -> ``(B, N, p*p*C)``."""
        x = self.embed(tokens[:, self.num_prefix_tokens:])  # (B, K, Dd), prefix tokens dropped
        b, k, d = x.shape
        n = ids_restore.shape[1]
        x = torch.cat([x, self.mask_token.expand(b, n - k, d)], dim=1)  # (B, N, Dd) in shuffled order
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))  # unshuffle
        x = self.blocks(x + self.pos_embed)
        return self.pred(self.norm(x))


@register_objective("mae")
class MAEObjective(Objective):
    """``(model, (x, y)) -> {"loss", "recon_loss"}`` for a :class:`~visionmoe.models.VisionTransformer`
    (dense or MoE); the decoder's parameters belong to this objective.

    Args:
        model: the encoder, used to size the decoder (patch size, grid, width, prefix tokens).
        mask_ratio: share of patches masked (MAE: 0.75).
        norm_pix_loss: normalise each target patch by its mean and std (MAE default).
    """

    def __init__(self, model: nn.Module, *, mask_ratio: float = 0.75, norm_pix_loss: bool = True,
                 decoder_dim: int = 128, decoder_depth: int = 2, decoder_heads: int = 4) -> None:
        super().__init__()
        pe = model.patch_embed
        self.patch_size = pe.patch_size[0]
        self.in_chans = pe.proj.in_channels
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.decoder = MAEDecoder(embed_dim=model.embed_dim, num_patches=pe.num_patches, grid=pe.grid_size,
                                  patch_size=self.patch_size, in_chans=self.in_chans, decoder_dim=decoder_dim,
                                  depth=decoder_depth, num_heads=decoder_heads,
                                  num_prefix_tokens=model.num_prefix_tokens)

    def target(self, imgs: Tensor) -> Tensor:
        t = patchify(imgs, self.patch_size)  # (B, N, p*p*C)
        if self.norm_pix_loss:
            mean, var = t.mean(-1, keepdim=True), t.var(-1, keepdim=True)
            t = (t - mean) / (var + 1e-6) ** 0.5
        return t

    def reconstruct(self, model: nn.Module, imgs: Tensor, routing_key: Tensor | None = None,
                    generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Predictions, mask and targets for a batch (no loss reduction)."""
        b = imgs.shape[0]
        n = model.patch_embed.num_patches
        ids_keep, mask, ids_restore = random_masking(b, n, self.mask_ratio, device=imgs.device, generator=generator)
        tokens = model.forward_visible(imgs, ids_keep, routing_key=routing_key)  # (B, P + K, D)
        pred = self.decoder(tokens, ids_restore)  # (B, N, p*p*C)
        return {"pred": pred, "mask": mask, "target": self.target(imgs), "tokens": tokens, "ids_keep": ids_keep}

    @staticmethod
    def masked_loss(out: dict[str, Tensor], per_image: bool = False) -> Tensor:
        """Mean squared error over the masked patches of :meth:`reconstruct`'s output: one scalar,
        or ``(B,)`` per image."""
        per_patch = (out["pred"] - out["target"]).pow(2).mean(-1)  # (B, N)
        if per_image:
            return (per_patch * out["mask"]).sum(-1) / out["mask"].sum(-1)
        return (per_patch * out["mask"]).sum() / out["mask"].sum()

    @torch.no_grad()
    def eval_batch(self, model: nn.Module, x: Tensor, y: Tensor, key: Tensor | None = None,
                   generator: torch.Generator | None = None) -> dict[str, float]:
        """Sum over the batch of the per-image masked-patch loss (``recon_loss``)."""
        out = self.reconstruct(model, x, routing_key=key, generator=generator)
        return {"recon_loss": float(self.masked_loss(out, per_image=True).sum())}

    def forward(self, model: nn.Module, batch, routing_key: Tensor | None = None) -> dict[str, Tensor]:
        imgs = batch[0] if isinstance(batch, (tuple, list)) else batch
        if routing_key is None and isinstance(batch, (tuple, list)) and len(batch) > 2:
            routing_key = batch[2]
        loss = self.masked_loss(self.reconstruct(model, imgs, routing_key))
        return {"loss": loss, "recon_loss": loss.detach()}
