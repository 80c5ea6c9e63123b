"""Evaluation protocols for self-supervised backbones (CR-MoE section 4): linear probe on
frozen features, few-shot transfer averaged over sampled splits with confidence intervals,
label subsets for semi-supervised fine-tuning, and routing consistency across views.

Axis legend: N images, D width, C classes, B batch, T tokens, K experts per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["label_subset", "linear_probe", "few_shot", "routing_consistency"]


def label_subset(y: Tensor, *, fraction: float | None = None, shots: int | None = None, seed: int = 0) -> Tensor:
    """Indices of a class-balanced labelled subset: ``shots`` images of every class, or
    ``round(fraction * n_c)`` (at least 1) of every class ``c``. Sorted, no repeats."""
    if (fraction is None) == (shots is None):
        raise ValueError("give exactly one of fraction= or shots=")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in torch.unique(y).tolist():
        idx = (y == c).nonzero().flatten()
        n = shots if shots is not None else max(1, round(fraction * len(idx)))
        if n > len(idx):
            raise ValueError(f"class {c} has {len(idx)} images, fewer than the {n} requested")
        picked.append(idx[torch.randperm(len(idx), generator=g)[:n]])
    return torch.cat(picked).sort().values


def linear_probe(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor, *, num_classes: int | None = None,
                 weight_decay: float = 1e-4, max_iter: int = 200) -> float:
    """Test accuracy of a softmax-regression classifier trained on frozen features
    (standardised with the training statistics, as MoCo v3's BN before the linear layer;
    full-batch L-BFGS with L2 ``weight_decay``)."""
    c = int(num_classes or int(max(train_y.max(), test_y.max())) + 1)
    mu, sd = train_f.mean(0), train_f.std(0, unbiased=False).clamp_min(1e-6)
    xtr, xte = (train_f - mu) / sd, (test_f - mu) / sd
    lin = nn.Linear(xtr.shape[1], c)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(xtr), train_y) + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float((lin(xte).argmax(-1) == test_y).float().mean())


def few_shot(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor, *, shots: int, episodes: int = 5,
             seed: int = 0, **probe_kwargs) -> dict[str, float]:
    """``shots`` labelled training images per class, a linear probe on their features, test
    accuracy; repeated over ``episodes`` sampled splits: mean, std and the 95% confidence
    half-width ``1.96 * std / sqrt(episodes)``."""
    accs = []
    for e in range(episodes):
        idx = label_subset(train_y, shots=shots, seed=seed * 1000 + e)
        accs.append(linear_probe(train_f[idx], train_y[idx], test_f, test_y, **probe_kwargs))
    t = torch.tensor(accs)
    std = float(t.std()) if len(t) > 1 else 0.0
    return {"mean": float(t.mean()), "std": std, "ci95": 1.96 * std / math.sqrt(len(t)), "episodes": len(t)}


@torch.no_grad()
def routing_consistency(model: nn.Module, x: Tensor, *, augment=None, iou_threshold: float = 0.2, seed: int = 0,
                        batch_size: int = 128, crop: bool = True) -> dict[int, dict[str, float]]:
    """CR-MoE's metric (its Fig. 3): for patch tokens of two augmented views that cover the same
    source region (IoU match), the mean number of experts shared by their top-k sets, against
    random non-corresponding pairs (a patch of another image); and the same for the CLS tokens
    of the two views (``cls_matched``) against another image's (``cls_random``) when the model
    has one. ``crop=False``: the paper's no-crop setting (both views are the whole image, only
    flips and colour change). Per token-level MoE block: ``{"matched", "random", "cls_matched",
    "cls_random", "k"}``."""
    from ..objectives.moco import TwoViewAugment, match_patches, patch_boxes

    pe = model.patch_embed
    grid = pe.grid_size[0]
    if augment is None:
        augment = TwoViewAugment(pe.img_size[0]) if crop else TwoViewAugment(pe.img_size[0], scale=(1.0, 1.0),
                                                                             ratio=(1.0, 1.0))
    has_cls = getattr(model, "cls_token", None) is not None
    was = model.training
    model.eval()
    sums: dict[int, list[float]] = {}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        for i in range(0, len(x), batch_size):
            v1, g1, v2, g2 = augment(x[i : i + batch_size])
            b = len(v1)
            model.forward_features(v1)
            r1 = {blk: rec.indices for blk, rec in model.routing().items() if rec.level == "token"}
            model.forward_features(v2)
            r2 = {blk: rec.indices for blk, rec in model.routing().items() if rec.level == "token"}
            idx, valid = match_patches(patch_boxes(g1, grid), patch_boxes(g2, grid), iou_threshold)
            ii, nn_ = valid.nonzero(as_tuple=True)
            other = (ii + torch.randint(1, max(b, 2), ii.shape, generator=g)) % b  # another image
            rand_pos = torch.randint(0, grid * grid, ii.shape, generator=g)
            for blk in r1:
                k = r1[blk].shape[-1]
                t1 = r1[blk].reshape(b, -1, k)
                t2 = r2[blk].reshape(b, -1, k)
                prefix = t1.shape[1] - grid * grid
                a = t1[ii, prefix + nn_]  # (P, K)
                m = t2[ii, prefix + idx[ii, nn_]]
                r = t2[other, prefix + rand_pos]
                shared_m = (a[:, :, None] == m[:, None, :]).any(-1).sum(-1).float()
                shared_r = (a[:, :, None] == r[:, None, :]).any(-1).sum(-1).float()
                s = sums.setdefault(blk, [0.0, 0.0, 0.0, float(k), 0.0, 0.0, 0.0])
                s[0] += float(shared_m.sum())
                s[1] += float(shared_r.sum())
                s[2] += len(a)
                if has_cls and prefix > 0:  # token 0 is the CLS token
                    c1, c2 = t1[:, 0], t2[:, 0]  # (B, K)
                    c_other = c2[(torch.arange(b) + torch.randint(1, max(b, 2), (b,), generator=g)) % b]
                    s[4] += float((c1[:, :, None] == c2[:, None, :]).any(-1).sum())
                    s[5] += float((c1[:, :, None] == c_other[:, None, :]).any(-1).sum())
                    s[6] += b
    model.train(was)
    out = {}
    for blk, s in sums.items():
        out[blk] = {"matched": s[0] / max(s[2], 1), "random": s[1] / max(s[2], 1), "k": int(s[3])}
        if s[6]:
            out[blk] |= {"cls_matched": s[4] / s[6], "cls_random": s[5] / s[6]}
    return out
