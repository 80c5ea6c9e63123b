"""One routing-analysis report for a MoE model on labelled images: expert load and dropped
tokens, distinct experts per image (CDF), class-by-expert occurrence, expert similarity,
token-to-expert maps over images, routing degree and measured paths. PNGs, ``analysis.json``
and ``report.md`` in one folder (``visionmoe analyze CHECKPOINT --data NAME``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from .routing import (
    cdf,
    class_expert_table,
    collect_routing,
    distinct_experts,
    dominant_expert_share,
    expert_similarity,
    patches_per_expert,
    routing_degree,
    routing_paths,
)

__all__ = ["analyze_routing", "plot_token_routing"]


def plot_token_routing(path: str | Path, images: Tensor, top1: dict[int, Tensor], grid: int,
                       num_experts: int) -> None:
    """Images (rows) with their patch grid coloured by each block's first-choice expert
    (columns); the prefix (CLS) token is dropped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = sorted(top1)
    n = len(images)
    fig, axes = plt.subplots(n, len(blocks) + 1, figsize=(1.8 * (len(blocks) + 1), 1.8 * n), squeeze=False)
    cmap = plt.get_cmap("tab20", max(num_experts, 2))
    for i in range(n):
        img = images[i].permute(1, 2, 0).squeeze(-1).clamp(0, 1).numpy()
        axes[i, 0].imshow(img, cmap="gray")
        for j, b in enumerate(blocks):
            t = top1[b][i]
            ids = t[-grid * grid :] if len(t) >= grid * grid else t[:1].expand(grid * grid)  # image-level: one id
            ax = axes[i, j + 1]
            ax.imshow(img, cmap="gray", extent=(0, grid, grid, 0))
            ax.imshow(ids.reshape(grid, grid).numpy(), cmap=cmap, vmin=0, vmax=max(num_experts - 1, 1), alpha=0.55,
                      extent=(0, grid, grid, 0))
            if i == 0:
                ax.set_title(f"block {b}", fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    fig.suptitle("first-choice expert of every patch (colour = expert)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


@torch.no_grad()
def analyze_routing(model: nn.Module, x: Tensor, y: Tensor, classes: list[str], out: str | Path, *,
                    routing_key: Tensor | None = None, examples: int = 6) -> dict:
    """Write the routing analysis of ``model`` on ``(x, y)`` to ``out``; returns the numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not (hasattr(model, "moe_layers") and model.moe_layers()):
        raise ValueError("the model has no MoE layers to analyse")
    rec = collect_routing(model, x, routing_key=routing_key)
    tables = class_expert_table(model, x, y, len(classes), routing_key=routing_key)
    blocks = sorted(rec)
    layers = dict(model.moe_layers())
    e = layers[blocks[0]].num_experts
    k = layers[blocks[0]].k
    res: dict = {"blocks": blocks, "num_experts": e, "top_k": k, "layers": {},
                 "routing_degree": routing_degree(e, k, len(blocks)),
                 "measured_paths": routing_paths({b: rec[b]["top1"] for b in blocks})}
    fig, axes = plt.subplots(5, len(blocks), figsize=(3.6 * len(blocks), 15), squeeze=False)
    for j, b in enumerate(blocks):
        counts = rec[b]["counts"]
        load = counts.sum(0) / counts.sum()
        dist = distinct_experts(counts)
        v, p = cdf(dist)
        sim = expert_similarity(counts)
        res["layers"][str(b)] = {
            "load": load.tolist(), "dropped_fraction": 1 - float(rec[b]["kept"].mean()),
            "distinct_experts_mean": float(dist.float().mean()), "distinct_experts_cdf": [v.tolist(), p.tolist()],
            "class_expert": tables[b].tolist(), "dominant_expert_share": dominant_expert_share(tables[b]),
            "similarity": sim.tolist(),
            "patches_per_expert_cdf": [[v_.tolist(), p_.tolist()] for v_, p_ in patches_per_expert(counts)]}
        axes[0, j].bar(range(e), load.tolist())
        axes[0, j].axhline(1 / e, color="gray", ls="--", lw=0.8)
        axes[0, j].set_title(f"block {b}: share of tokens per expert", fontsize=8)
        axes[1, j].step(v.tolist(), p.tolist(), where="post")
        axes[1, j].set_xlabel("distinct experts per image", fontsize=8)
        axes[1, j].set_ylabel("CDF", fontsize=8)
        axes[2, j].imshow(tables[b].numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
        axes[2, j].set_yticks(range(len(classes)), classes if j == 0 else [], fontsize=6)
        axes[2, j].set_xlabel("expert (class-by-expert share of tokens)", fontsize=8)
        im = axes[3, j].imshow(sim.numpy(), cmap="magma", vmin=0, vmax=1)
        axes[3, j].set_xlabel("expert similarity S_ij", fontsize=8)
        fig.colorbar(im, ax=axes[3, j], fraction=0.046)
        for ei, (v_, p_) in enumerate(patches_per_expert(counts)):  # Sweet spot Fig. 8: one curve per expert
            if len(v_):
                axes[4, j].step(v_.tolist(), p_.tolist(), where="post", lw=0.8, label=f"expert {ei}")
        axes[4, j].set_xlabel("patches of an image on the expert (images where active)", fontsize=8)
        axes[4, j].set_ylabel("CDF", fontsize=8)
        if e <= 8:
            axes[4, j].legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(out / "routing_analysis.png", dpi=90)
    plt.close(fig)
    grid = model.patch_embed.grid_size[0]
    picks = torch.cat([(y == c).nonzero().flatten()[:1] for c in torch.unique(y)])[:examples]
    plot_token_routing(out / "token_routing.png", x[picks], {b: rec[b]["top1"][picks] for b in blocks}, grid, e)
    (out / "analysis.json").write_text(json.dumps(res, indent=2))
    lines = ["# Routing analysis", "",
             f"{len(x)} images, MoE blocks {blocks}, {e} experts, top-{k}. Routing degree C({e},{k})^{len(blocks)} = "
             f"{res['routing_degree']:,}; measured: {res['measured_paths']['mean_paths_per_image']:.1f} distinct "
             f"first-choice paths among the tokens of an image, {res['measured_paths']['distinct_image_paths']} "
             "distinct image-level paths.", "",
             "| block | max load | dropped | distinct experts per image | classes on one expert |",
             "|---|---|---|---|---|"]
    for b in blocks:
        d = res["layers"][str(b)]
        lines.append(f"| {b} | {max(d['load']):.3f} | {d['dropped_fraction']:.3f} | "
                     f"{d['distinct_experts_mean']:.2f} | {d['dominant_expert_share']:.2f} |")
    lines += ["", "Rows: load per expert, CDF of distinct experts per image, class-by-expert share, expert "
              "similarity, and per expert the CDF of the number of an image's patches it processes, over the "
              "images where it is active (Sweet spot Fig. 8).", "", "![analysis](routing_analysis.png)", "",
              "![token routing](token_routing.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    return res
