"""The MoCE demo's report: reconstructions and PSNR, routing and cluster plots, the
per-task tables over seeds, the paired differences, ``report.md``."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..analysis import dominant_expert_share
from ..data import TensorSplits
from ..eval import extract_features
from ..models import VisionTransformer
from ..objectives import MAEObjective, patchify, unpatchify
from ..train import Trainer
from .common import logged_curve

if TYPE_CHECKING:
    from .moce_demo import MoCEDemoConfig

__all__ = ["CLAIMS", "paired_comparisons", "reconstruction", "plot_routing", "save_plots", "summary_table",
           "method_table", "write_report"]


#: the demo's claims, ``(a, b)`` = "a beats b" in fine-tuned accuracy
CLAIMS = (("MoCE", "MAE*"), ("MoCE", "TokenMoE"), ("MAE*", "random init"), ("TokenMoE", "random init"),
          ("MoCE", "random init"))


def paired_comparisons(runs: list[dict]) -> dict:
    """Per task, the seed-paired fine-tuned accuracy differences of :data:`CLAIMS` with their 95%
    intervals and verdicts (``reproduced`` / ``refuted`` / ``not resolved``)."""
    from ..eval.stats import paired_difference

    def col(run: dict, task: str, m: str):
        return run["acc"][task].get(m, run.get("baselines", {}).get(task, {}).get(m))

    out: dict = {}
    for task in runs[0]["acc"]:
        out[task] = {}
        for a, b in CLAIMS:
            va, vb = [col(r, task, a) for r in runs], [col(r, task, b) for r in runs]
            if any(v is None for v in va + vb):
                continue
            out[task][f"{a} - {b}"] = paired_difference(va, vb)
    return out


@torch.no_grad()
def reconstruction(objective: MAEObjective, model: VisionTransformer, x: Tensor, enc, clustering=None
                    ) -> tuple[float, float]:
    """``(psnr, mse)`` of the masked patches of ``x``: the mean PSNR (dB) in pixel space (the
    targets' per-patch normalisation undone with the true patch statistics, as MAE's
    visualisation does, which flatters the pictures) and the mean squared error in the
    normalised space the model is trained in (its MAE loss on these images). A MoCE model
    routes each image by its assigned cluster."""
    was = model.training
    model.eval()
    key = clustering.assign(extract_features(enc, x)) if clustering is not None else None
    out = objective.reconstruct(model, x, key, generator=torch.Generator().manual_seed(0))
    p, m = objective.patch_size, out["mask"]
    err = (_denorm(out["pred"], x, p).clamp(0, 1) - patchify(x, p)).pow(2).mean(-1)  # (B, N)
    mse = (err * m).sum(-1) / m.sum(-1)
    norm_err = (out["pred"] - objective.target(x)).pow(2).mean(-1)
    model.train(was)
    return (float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean()),
            float((norm_err * m).sum() / m.sum()))

def plot_routing(path: Path, tables: dict, mix) -> None:
    """Class-by-expert share of tokens, TokenMoE vs MoCE, every MoE block (MoCE Fig. 3a/3c)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = max(len(t) for t in tables.values())
    fig, axes = plt.subplots(len(tables), ncol, figsize=(3.2 * ncol + 1, 0.22 * len(mix.classes) * len(tables) + 1),
                             squeeze=False)
    for r, (method, tb) in enumerate(tables.items()):
        for col, (blk, t) in enumerate(tb.items()):
            ax = axes[r, col]
            ax.imshow(t.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"{method}, block {blk}: share {dominant_expert_share(t):.0%}", fontsize=8)
            ax.set_xlabel("expert", fontsize=8)
            ax.set_xticks(range(t.shape[1]))
            ax.set_yticks(range(len(mix.classes)), mix.classes if col == 0 else [], fontsize=5)
    fig.suptitle("share of each class's tokens per expert ('share': most classes on one expert)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

def summary_table(res: dict):
    from rich.table import Table

    n = len(res["runs"])
    t = Table(title="fine-tuned test accuracy" + (", mean ± std over seeds" if n > 1 else " (one seed)"))
    t.add_column("task")
    methods = list(next(iter(res["tasks"].values())))
    base = res.get("baselines") or {}
    extra = list(next(iter(base.values()))) if base else []
    for m in methods + extra:
        t.add_column(m if m in methods else f"[dim]{m}", justify="right")

    def fmt(d):
        return f"{d['mean']:.4f}" + (f" ± {d['std']:.4f}" if n > 1 else "")

    for task, m in res["tasks"].items():
        best = max(methods, key=lambda k: m[k]["mean"])
        rand = base.get(task, {}).get("random init")
        cells = [("[bold]" if k == best else "") + fmt(m[k]) + (" [red]†" if rand and m[k]["mean"] <= rand["mean"]
                                                                 else "") for k in methods]
        t.add_row(task, *cells, *[f"[dim]{fmt(base[task][b])}" for b in extra])
    return t

def save_plots(sd: Path, mae: Trainer, enc, moce, clustering, pool: TensorSplits, keys, c: MoCEDemoConfig,
               tasks: dict) -> None:
    """The demo's four figures in ``sd``: ``mae_loss.png``, ``reconstructions.png``,
    ``clusters.png`` and ``cluster_expert.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for draw, name in ((lambda: _plot_losses(plt, sd, mae), "mae_loss.png"),
                       (lambda: _plot_reconstructions(plt, mae, enc, pool), "reconstructions.png"),
                       (lambda: _plot_clusters(plt, clustering, pool, keys, c), "clusters.png"),
                       (lambda: _plot_cluster_experts(plt, moce, clustering, tasks), "cluster_expert.png")):
        fig = draw()
        fig.tight_layout()
        fig.savefig(sd / name, dpi=100)
        plt.close(fig)


def _plot_losses(plt, sd: Path, mae: Trainer):
    """MAE pre-training, then the three continuations with equal extra compute."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    axes[0].plot(*logged_curve(mae.run_dir))
    axes[0].set_title("dense MAE pre-training", fontsize=9)
    for name, label in (("mae_star", "MAE*"), ("tokenmoe", "TokenMoE"), ("moce", "MoCE")):
        axes[1].plot(*logged_curve(sd / name, "recon_loss"), label=label)
    axes[1].set_title("continuation (equal steps): masked-patch loss", fontsize=9)
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("MAE loss")
    return fig


def _plot_reconstructions(plt, mae: Trainer, enc, pool: TensorSplits):
    """Eight test images: the input, what the encoder sees, the reconstruction."""
    with torch.no_grad():
        enc.eval()
        x = pool.x_test[torch.randperm(len(pool.x_test), generator=torch.Generator().manual_seed(0))[:8]]
        out = mae.objective.reconstruct(enc, x, generator=torch.Generator().manual_seed(0))
        p = mae.objective.patch_size
        masked = unpatchify(
            torch.where(out["mask"].unsqueeze(-1).bool(), torch.zeros_like(out["target"]),
                        patchify(x, p)), p, 1, x.shape[-2], x.shape[-1])
        rec = unpatchify(_denorm(out["pred"], x, p), p, 1, x.shape[-2], x.shape[-1])
    fig, axes = plt.subplots(3, 8, figsize=(10, 4))
    for i in range(8):
        for r, img in enumerate((x[i, 0], masked[i, 0], rec[i, 0].clamp(0, 1))):
            axes[r, i].imshow(img.numpy(), cmap="gray")
            axes[r, i].axis("off")
    axes[0, 0].set_title("input", fontsize=8, loc="left")
    axes[1, 0].set_title("visible 25%", fontsize=8, loc="left")
    axes[2, 0].set_title("reconstruction", fontsize=8, loc="left")
    return fig


def _plot_clusters(plt, clustering, pool: TensorSplits, keys, c: MoCEDemoConfig):
    """Cluster sizes and ten example images of each of the first twelve clusters."""
    sizes = torch.bincount(keys, minlength=clustering.num_clusters)
    shown = min(12, clustering.num_clusters)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 1.6]})
    axes[0].bar(range(len(sizes)), sizes.tolist())
    axes[0].set_xlabel("cluster")
    axes[0].set_ylabel("pre-training images")
    axes[0].set_title("Sinkhorn-Knopp clusters (argmax of Q)", fontsize=9)
    grid = []
    for k in range(shown):
        idx = (keys == k).nonzero().flatten()[:10]
        row = [pool.x_train[i, 0] for i in idx] + [torch.zeros(c.img_size, c.img_size)] * (10 - len(idx))
        grid.append(torch.cat(row, dim=1))
    axes[1].imshow(torch.cat(grid, dim=0).numpy(), cmap="gray")
    axes[1].set_title(f"10 images from each of clusters 0-{shown - 1} (one row per cluster)", fontsize=9)
    axes[1].axis("off")
    return fig


def _plot_cluster_experts(plt, moce, clustering, tasks: dict):
    """The cluster -> expert gate matrix of each MoCE layer, and where each task's images fall."""
    layers = moce.moe_layers()
    fig, axes = plt.subplots(1, len(layers) + 1, figsize=(4 * (len(layers) + 1), 4), squeeze=False)
    for ax, (blk, layer) in zip(axes[0], layers):
        with torch.no_grad():
            layer.router.eval()
            r = layer.router(torch.zeros(clustering.num_clusters, 1, 1), torch.arange(clustering.num_clusters))
        im = ax.imshow(r.probs.numpy(), aspect="auto", cmap="viridis")
        ax.scatter(r.indices[:, 0].numpy(), range(clustering.num_clusters), marker="x", color="red", s=12)
        ax.set_xlabel("expert (x: chosen)")
        ax.set_xticks(range(r.probs.shape[1]))
        ax.set_ylabel("cluster")
        ax.set_title(f"block {blk}: gate probabilities", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    ax = axes[0, -1]
    hist = torch.tensor([v["histogram"] for v in tasks.values()], dtype=torch.float)
    ax.imshow((hist / hist.sum(1, keepdim=True)).numpy(), aspect="auto", cmap="magma")
    ax.set_yticks(range(len(tasks)), list(tasks), fontsize=8)
    ax.set_xlabel("cluster")
    ax.set_title("share of each task's images per cluster", fontsize=9)
    return fig


def _denorm(pred, x, p):
    """Undo the per-patch normalisation of the targets, using the input's patch statistics."""
    t = patchify(x, p)
    return pred * (t.var(-1, keepdim=True) + 1e-6) ** 0.5 + t.mean(-1, keepdim=True)

def method_table(title: str, table: dict, digits: int = 4, level: str = "##", seeds: int = 2,
                  baselines: dict | None = None) -> list[str]:
    """A markdown section: one row per task (mean ± std of each method, the best in bold; no
    ± with one seed) and the average over tasks; ``table[task][method]`` is a :func:`mean_std`
    dict. ``baselines[task][name]`` adds those columns; a method at or below the random-init
    fine-tune is marked with a dagger."""
    methods = list(next(iter(table.values())))
    extra = list(next(iter(baselines.values()))) if baselines else []
    lines = [f"{level} {title}", "", "| task | " + " | ".join(methods + [f"baseline: {b}" for b in extra]) + " |",
             "|---" * (len(methods) + len(extra) + 1) + "|"]

    def cell(d):  # no ± with one seed, nor for a baseline that is the same in every seed
        return f"{d['mean']:.{digits}f}" + (f" ± {d['std']:.{digits}f}" if seeds > 1 and d["std"] > 0 else "")

    flagged = False
    for task, m in table.items():
        best = max(methods, key=lambda k: m[k]["mean"])
        rand = (baselines or {}).get(task, {}).get("random init")
        cells = []
        for k in methods:
            v = cell(m[k])
            v = f"**{v}**" if k == best else v
            if rand is not None and m[k]["mean"] <= rand["mean"]:
                v += " †"
                flagged = True
            cells.append(v)
        cells += [cell(baselines[task][b]) for b in extra]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    means = {k: statistics.mean(table[t][k]["mean"] for t in table) for k in methods}
    # the baseline columns stay empty in the average row
    lines.append("| **average** | " + " | ".join(f"{means[k]:.{digits}f}" for k in methods) + " |" * (len(extra) + 1))
    if flagged:
        lines += ["", "**Warning: † marks a pre-trained encoder that does not beat the same fine-tune from random "
                  "initialisation; its number is not evidence for the method.**"]
    return [*lines, ""]

def _paired_lines(paired: dict) -> list[str]:
    from ..eval.stats import format_difference

    if not paired:
        return []
    lines = ["## Seed-paired differences of fine-tuned accuracy (95% t interval)", "",
             "`reproduced`: the interval excludes 0 in the claimed direction (a > b); `refuted`: it excludes 0 the "
             "other way; `not resolved`: it contains 0.", "", "| task | comparison (a - b) | difference |",
             "|---|---|---|"]
    for task, d in paired.items():
        lines += [f"| {task} | {k} | {format_difference(v)} |" for k, v in d.items()]
    return [*lines, ""]

def _search_cost_lines(sel: dict) -> list[str]:
    """MoCE Table 5: for each selection method, the mean test accuracy of its picks and its
    measured cost per downstream task, and the cost for 1, 10 and 100 tasks (every method
    is per task; MoCE's clustering was paid once during pre-training)."""
    tasks = [t for t in sel if t != "candidates" and "seconds" in sel[t]]
    if not tasks:
        return []
    methods = ["largest cluster (MoCE)", "k-NN", "LogME", "early-stop search", "exhaustive"]
    lines = ["Search cost (MoCE Table 5): accuracy of the pick and seconds spent choosing, mean over tasks; "
             "the cost grows linearly with the number of downstream tasks.", "",
             "| method | mean test accuracy of the pick | seconds per task | 10 tasks | 100 tasks |",
             "|---|---|---|---|---|"]
    for m in methods:
        acc = statistics.mean(sel[t]["exhaustive_best"] if m == "exhaustive" else sel[t]["picked"][m]["test_acc"]
                              for t in tasks)
        sec = statistics.mean(sel[t]["seconds"][m] for t in tasks)
        lines.append(f"| {m} | {acc:.4f} | {sec:.2f} | {10 * sec:.0f} | {100 * sec:.0f} |")
    return [*lines, ""]

def _seed_lines(r: dict) -> list[str]:
    """The report's section for one seed: placement, reconstruction, selection, timings, PSNR,
    routing collapse, plots, the selection methods and the SDR search when run."""
    s = r["seed"]
    lines: list[str] = []
    lines += [f"## Seed {s}", "", f"Experts in blocks {r['blocks']} (MLP gradient norms under the MAE loss: "
              + ", ".join(f"{v:.3g}" for v in r["grad_scores"]) + ").", "",
              "Masked-patch reconstruction loss on held-out pool images after the extra steps (lower is "
              "better): " + ", ".join(f"{k} {v:.4f}" for k, v in r["recon"].items()) + ".", "",
              "Cluster chosen for each task (share of its images): "
              + ", ".join(f"{t} -> {v['cluster']} ({v['share']:.0%})" for t, v in r["selection"].items()), "",
              "Time per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in r.get("timings_s", {}).items()), "",
              *([f"MAE pre-training loss, mean of the first / last tenth of the logged steps: "
                 f"{r['mae_loss']['first']:.4f} -> {r['mae_loss']['last']:.4f} "
                 + ("(falls)." if r["mae_loss"]["falls"] else "(**does not fall**: not evidence of learning)."),
                 ""] if "mae_loss" in r else []),
              "Reconstruction PSNR (dB) on each task's test images (MoCE Fig. 3d; the predicted patches are "
              "un-normalised with the true mean and std of each masked patch, which flatters the pictures and "
              "compresses the gaps between methods): "
              + "; ".join(f"{t}: " + ", ".join(f"{m} {v:.2f}" for m, v in d.items())
                          for t, d in r.get("psnr", {}).items()), "",
              "Masked-patch error in the normalised space the models are trained in (their MAE loss on each "
              "task's test images; lower is better, the fairer comparison): "
              + "; ".join(f"{t}: " + ", ".join(f"{m} {v:.4f}" for m, v in d.items())
                          for t, d in r.get("recon_task", {}).items()), "",
              "Routing collapse, the largest share of the pool's classes whose main expert is one "
              "expert (1.0 = every class on the same expert): "
              + "; ".join(f"{m} " + ", ".join(f"block {b} {v:.2f}" for b, v in d.items())
                          for m, d in r.get("collapse", {}).items()), "",
              f"![loss curves](seed{s}/mae_loss.png)", "", f"![reconstructions](seed{s}/reconstructions.png)", "",
              f"![clusters](seed{s}/clusters.png)", "", f"![cluster to expert](seed{s}/cluster_expert.png)", "",
              f"![routing by class](seed{s}/routing.png)", ""]
    sel = r.get("selection_methods")
    if sel:
        lines += ["### Expert selection methods (MoCE Table 5)", "",
                  f"Candidates: clusters {sel['candidates']} (one per distinct expert choice). "
                  "Test accuracy of the dense model each method picks, after full fine-tuning:", "",
                  "| task | largest cluster (MoCE) | k-NN | LogME | early-stop search | exhaustive best "
                  "| exhaustive worst |", "|---|---|---|---|---|---|---|"]
        for t, d in sel.items():
            if t == "candidates":
                continue
            pk = d["picked"]
            lines.append(f"| {t} | " + " | ".join(f"{pk[m]['test_acc']:.4f}" for m in pk)
                         + f" | {d['exhaustive_best']:.4f} | {d['exhaustive_worst']:.4f} |")
        lines += ["", *_search_cost_lines(sel)]
    if r.get("sdr_search"):
        lines += ["### SDR(ViT): brute-force subnet search (MoCE Table 3 baseline)", "",
                  "| task | subnets searched | picked | validation accuracy of the pick | search seconds "
                  "| MoCE selection seconds |", "|---|---|---|---|---|---|"]
        for t, d in r["sdr_search"].items():
            lines.append(f"| {t} | {len(d['val_acc'])} | {d['picked']} | {d['val_acc'][str(d['picked'])]:.4f} "
                         f"| {d['seconds']:.1f} | {r['selection'][t].get('seconds', float('nan')):.2f} |")
        lines.append("")
    return lines


def _augment_words(cfg: dict) -> str:
    from .moce_pipeline import task_augment

    setting = cfg.get("finetune_augment", "none")
    if setting != "auto":
        return setting
    tasks = cfg.get("tasks") or [*cfg.get("sources", []), "digits"]
    return "per task: " + ", ".join(f"{t} {task_augment(setting, t)}" for t in tasks)


def write_report(out: Path, res: dict) -> None:
    cfg = res["config"]
    n = len(res["runs"])
    lines = ["# MoCE demo report", "",
             f"Pre-training pool: {cfg['per_source']} images per source from {cfg['sources']}; ViT {cfg['vit']}; "
             f"{cfg['mae_steps']} MAE steps (lr {cfg['mae_lr']:g}; "
             f"{'one dense MAE for every seed' if cfg.get('shared_mae') else 'one dense MAE per seed'}), then "
             f"{cfg['extra_steps']} extra steps each for MAE*, TokenMoE and MoCE "
             f"({cfg['num_experts']} experts, {cfg['num_clusters']} clusters); fine-tuning {cfg['finetune_steps']} "
             f"{cfg.get('finetune_optim', 'sgd')} steps (lr {cfg['finetune_lrs']}, layer decay "
             f"{cfg.get('finetune_layer_decay')} for pre-trained encoders, label smoothing "
             f"{cfg.get('label_smoothing', 0)}, augmentation {_augment_words(cfg)}) on up to "
             f"{cfg['finetune_train_limit']} images per task; the baselines use the same images and the same "
             f"fine-tune. Seeds {[r['seed'] for r in res['runs']]}, {res['seconds'] / 60:.1f} min in total.", "",
             *method_table("Fine-tuned accuracy per downstream task" + (" (mean ± std over seeds)" if n > 1 else
                                                                         " (one seed)"), res["tasks"], seeds=n,
                            baselines=res.get("baselines")),
             *_paired_lines(res.get("paired", {}))]
    if res.get("probe"):
        lines += method_table("Linear probe on frozen features (same images" + ("; mean ± std over seeds)" if n > 1
                                                                                 else "; one seed)"), res["probe"],
                               seeds=n)
    if res.get("lr"):
        lines += ["Fine-tuning learning rate chosen on a validation split (first seed): "
                  + "; ".join(f"{t}: " + ", ".join(f"{m} {v['chosen']:g}" for m, v in d.items())
                              for t, d in res["lr"].items()), ""]
    p, sp = res.get("params", {}), res.get("speed", {})
    if p:
        lines += ["## Deployment: parameters and inference speed", "",
                  "| model | parameters | images/s (inference, one run) |", "|---|---|---|",
                  f"| deployed dense ViT (MoCE, one cluster's experts) | {p['deployed_dense']:,} | "
                  f"{sp.get('deployed dense ViT', float('nan')):.0f} |",
                  f"| MoCE with all experts | {p['moce_total']:,} | {sp.get('MoCE (all experts)', float('nan')):.0f} |",
                  f"| TokenMoE | {p['tokenmoe_total']:,} | {sp.get('TokenMoE', float('nan')):.0f} |",
                  f"| MAE encoder (dense) | {p['mae']:,} | {sp.get('MAE encoder (dense)', float('nan')):.0f} |", ""]
    for r in res["runs"]:
        lines += _seed_lines(r)
    from .._utils import atomic_write_bytes

    atomic_write_bytes(out / "report.md", "\n".join(lines).encode())
