"""The MoCE pipeline end to end on bundled real images, with MAE* and TokenMoE baselines.

1. Pre-training pool: a mixture of real sources (Fashion-MNIST, MNIST, textures, faces),
   all 28x28 grey; the downstream tasks are the individual sources.
2. Dense MAE pre-training of a CPU-sized ViT on the pool.
3. Unit-norm MAE features -> balanced Sinkhorn-Knopp clustering.
4. Blocks for experts: the MLPs with the largest MAE-loss gradients.
5. Equal extra compute for three continuations: MAE* (the dense MAE trained on), TokenMoE
   (token-routed noisy top-1 experts, importance + load losses) and MoCE (cluster-conditional
   experts, imbalance + distillation losses).
6. Transfer to every task: MAE* and TokenMoE fine-tune the whole model; MoCE assigns the
   task's images to clusters, keeps the largest cluster's experts as a dense ViT and
   fine-tunes that. SGD momentum 0.9, no weight decay, cosine schedule (MoCE A.5).
7. A markdown report with plots, and the per-task accuracy table over seeds.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..analysis import gradient_magnitude_scores
from ..clustering import ClusterConfig, fit_clusters
from ..data import TensorSplits, load_dataset, make_mixture
from ..eval import extract_features
from ..models import VisionTransformer, count_parameters
from ..moe.placement import by_scores
from ..moe.upcycle import upcycle_state_dict
from ..objectives import MAEObjective, patchify, unpatchify
from ..train import Trainer, config_from_dict
from .moce import MoCEObjective, build_moce, deploy, select_cluster

__all__ = ["MoCEDemoConfig", "run_moce_demo"]


@dataclass
class MoCEDemoConfig:
    """Sizes and budgets of the demo (defaults: about 15 minutes on 2 CPU cores)."""

    sources: list[str] = field(default_factory=lambda: ["fashion_mnist", "mnist5k", "textures", "faces"])
    per_source: int = 2000
    img_size: int = 28
    vit: dict = field(default_factory=lambda: dict(patch_size=4, embed_dim=64, depth=6, num_heads=4))
    mae_steps: int = 600
    extra_steps: int = 300
    finetune_steps: int = 150
    finetune_lr: float = 0.03
    finetune_train_limit: int = 2000
    num_clusters: int = 16
    num_experts: int = 4
    moe_blocks: int = 2
    batch_size: int = 128
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    threads: int | None = None

    @classmethod
    def quick(cls) -> MoCEDemoConfig:
        return cls(per_source=400, mae_steps=60, extra_steps=30, finetune_steps=30, num_clusters=8,
                   vit=dict(patch_size=4, embed_dim=32, depth=4, num_heads=2), seeds=[0],
                   finetune_train_limit=400, batch_size=64)


def _cfg(objective: str, steps: int, bs: int, lr: float, optim: str = "adamw", seed: int = 0, wd: float = 0.05,
         **objective_args) -> dict:
    return {"objective": objective, "objective_args": objective_args,
            "data": {"name": "pool", "augment": "none", "batch_size": bs},
            "optim": {"name": optim, "lr": lr, "weight_decay": wd, "momentum": 0.9},
            "schedule": {"max_steps": steps, "warmup_epochs": 0.05, "min_lr": 0.0},
            "run": {"seed": seed, "progress": False, "log_every": 10, "eval_every_epochs": 1e9,
                    "checkpoint_every": 10**9, "keep_checkpoints": 1}}


def _mae_kwargs(c: MoCEDemoConfig) -> dict:
    return dict(mask_ratio=0.75, decoder_dim=max(32, c.vit["embed_dim"]), decoder_depth=1,
                decoder_heads=c.vit["num_heads"])


def _train(model, data: TensorSplits, cfg: dict, run_dir: Path, objective=None) -> Trainer:
    t = Trainer(config_from_dict(cfg), data=data, model=model, objective=objective, run_dir=run_dir)
    t.fit()
    return t


def _finetune(backbone: VisionTransformer, task: TensorSplits, c: MoCEDemoConfig, seed: int, run_dir: Path,
              routing_key: int | None = None) -> float:
    model = copy.deepcopy(backbone)
    model.reset_classifier(task.num_classes, global_pool="avg")
    model.head.reset_parameters()
    if task.num_classes and len(task.x_train) > c.finetune_train_limit:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(task.x_train), generator=g)[: c.finetune_train_limit]
        task = TensorSplits(task.name, task.x_train[idx], task.y_train[idx], task.x_test, task.y_test,
                            task.classes)
    if routing_key is not None:  # a keyed MoE fine-tuned as is: every image takes the task's key
        task = task.with_keys(torch.full((len(task.x_train),), routing_key),
                              torch.full((len(task.x_test),), routing_key))
    cfg = _cfg("classification", c.finetune_steps, c.batch_size, c.finetune_lr, optim="sgd", seed=seed, wd=0.0)
    return _train(model, task, cfg, run_dir).evaluate()["test_acc"]


def run_moce_demo(c: MoCEDemoConfig | None = None, *, out: str | Path = "runs/moce_demo",
                  progress: bool = True) -> dict:
    """Run the whole pipeline; returns the results and writes ``report.md`` with plots to ``out``."""
    from rich.console import Console

    c = c or MoCEDemoConfig()
    if c.threads:
        torch.set_num_threads(c.threads)
    console = Console(quiet=not progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    sources = [load_dataset(n) for n in c.sources]
    tasks = {s.name: TensorSplits(s.name, *(_adapt_all(s, c.img_size)), s.classes) for s in sources}
    mix = make_mixture(sources, size=c.img_size, channels=1, per_source=c.per_source, seed=0)
    pool = mix.as_splits("source")
    console.print(f"[bold]MoCE demo[/]: pool of {len(pool.x_train)} images from {mix.sources}; "
                  f"tasks {list(tasks)}; seeds {c.seeds}")
    results: dict = {"config": asdict(c), "tasks": {}, "runs": []}
    for seed in c.seeds:
        torch.manual_seed(seed)
        sd = out / f"seed{seed}"
        vit_args = dict(img_size=c.img_size, in_chans=1, num_classes=0, **c.vit)
        # 2. dense MAE
        t0 = time.perf_counter()
        enc = VisionTransformer(**vit_args)
        mae = _train(enc, pool, _cfg("mae", c.mae_steps, c.batch_size, 1.5e-3, seed=seed, **_mae_kwargs(c)),
                     sd / "mae")
        timings[f"mae_s{seed}"] = time.perf_counter() - t0
        console.print(f"seed {seed}: MAE done ({timings[f'mae_s{seed}']:.0f} s)")
        # 3. clustering
        feats = extract_features(enc, pool.x_train)
        clustering = fit_clusters(feats, ClusterConfig(num_clusters=c.num_clusters, batch_size=512, seed=seed),
                                  feature_source=f"seed{seed}/mae")
        clustering.save(sd / "clusters.safetensors")
        keys_tr = clustering.assign_balanced(feats)  # Q of eq. 2 for the pre-training images
        keys_te = clustering.assign(extract_features(enc, pool.x_test))
        # 4. placement by gradient magnitude under the MAE loss
        probe = MAEObjective(enc, **_mae_kwargs(c))
        probe.decoder.load_state_dict(mae.objective.decoder.state_dict())
        batches = [(pool.x_train[i : i + c.batch_size],) for i in range(0, 4 * c.batch_size, c.batch_size)]
        scores = gradient_magnitude_scores(enc, batches, lambda m, b, probe=probe: probe(m, b)["loss"])
        blocks = by_scores(scores, c.moe_blocks)
        # 5. equal extra compute
        extra = _cfg("mae", c.extra_steps, c.batch_size, 1.5e-4, seed=seed, **_mae_kwargs(c))  # base lr x 0.1
        mae_star = copy.deepcopy(enc)
        obj = MAEObjective(mae_star, **_mae_kwargs(c))
        obj.decoder.load_state_dict(mae.objective.decoder.state_dict())
        t_star = _train(mae_star, pool, extra, sd / "mae_star", objective=obj)
        token = VisionTransformer(moe=dict(num_experts=c.num_experts, top_k=1, placement=blocks, noise_std=1.0),
                                  **vit_args)
        token.load_state_dict(upcycle_state_dict(enc.state_dict(), blocks, c.num_experts, noise=0.01, seed=seed),
                              strict=False)
        obj = MAEObjective(token, **_mae_kwargs(c))
        obj.decoder.load_state_dict(mae.objective.decoder.state_dict())
        t_tok = _train(token, pool, extra, sd / "tokenmoe", objective=obj)
        moce = build_moce(enc, clustering, blocks=blocks, num_experts=c.num_experts, noise=0.01, seed=seed)
        obj = MoCEObjective(moce, enc, **_mae_kwargs(c))
        obj.decoder.load_state_dict(mae.objective.decoder.state_dict())
        t_moce = _train(moce, pool.with_keys(keys_tr, keys_te), extra, sd / "moce", objective=obj)
        run = {"seed": seed, "blocks": blocks, "grad_scores": scores,
               "cluster_sizes": torch.bincount(keys_tr, minlength=c.num_clusters).tolist(),
               "recon": {"mae_star": t_star.evaluate()["test_recon_loss"],
                         "tokenmoe": t_tok.evaluate()["test_recon_loss"],
                         "moce": t_moce.evaluate()["test_recon_loss"]},
               "tokenmoe_routing": t_tok.evaluate()["routing"], "acc": {}, "selection": {}}
        # 6. transfer
        for name, task in tasks.items():
            sel = select_cluster(enc, clustering, task.x_train)
            run["selection"][name] = {"cluster": sel.cluster, "share": sel.share}
            deployed = deploy(moce, sel.cluster)
            run["acc"][name] = {
                "MAE*": _finetune(mae_star, task, c, seed, sd / f"ft_mae_{name}"),
                "TokenMoE": _finetune(token, task, c, seed, sd / f"ft_tok_{name}"),
                "MoCE": _finetune(deployed, task, c, seed, sd / f"ft_moce_{name}"),
            }
            console.print(f"seed {seed} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in run["acc"][name].items()))
        results["runs"].append(run)
        results["params"] = {"moce_total": count_parameters(moce)["total"],
                             "deployed_dense": count_parameters(deploy(moce, 0))["total"],
                             "tokenmoe_total": count_parameters(token)["total"], "mae": count_parameters(enc)["total"]}
        _save_plots(sd, mae, enc, moce, clustering, pool, keys_tr, c)
    for name in tasks:
        results["tasks"][name] = {}
        for method in ("MAE*", "TokenMoE", "MoCE"):
            vals = [r["acc"][name][method] for r in results["runs"]]
            results["tasks"][name][method] = {"mean": statistics.mean(vals),
                                              "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    results["seconds"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _write_report(out, results)
    console.print(f"report: {out / 'report.md'} ({results['seconds']:.0f} s)")
    return results


def _adapt_all(s: TensorSplits, size: int):
    from ..data import adapt

    return adapt(s.x_train, channels=1, size=size), s.y_train, adapt(s.x_test, channels=1, size=size), s.y_test


def _save_plots(sd: Path, mae: Trainer, enc, moce, clustering, pool: TensorSplits, keys, c: MoCEDemoConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in (mae.run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("MAE loss (masked patches)")
    fig.tight_layout()
    fig.savefig(sd / "mae_loss.png", dpi=100)
    plt.close(fig)
    # reconstructions
    with torch.no_grad():
        enc.eval()
        x = pool.x_test[:8]
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
    fig.tight_layout()
    fig.savefig(sd / "reconstructions.png", dpi=100)
    plt.close(fig)
    # cluster sizes and example images
    sizes = torch.bincount(keys, minlength=clustering.num_clusters)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5), gridspec_kw={"width_ratios": [1, 2]})
    axes[0].bar(range(len(sizes)), sizes.tolist())
    axes[0].set_xlabel("cluster")
    axes[0].set_ylabel("images")
    grid = []
    for k in range(min(8, clustering.num_clusters)):
        idx = (keys == k).nonzero().flatten()[:8]
        row = [pool.x_train[i, 0] for i in idx] + [torch.zeros(c.img_size, c.img_size)] * (8 - len(idx))
        grid.append(torch.cat(row, dim=1))
    axes[1].imshow(torch.cat(grid, dim=0).numpy(), cmap="gray")
    axes[1].set_title("8 images from each of the first 8 clusters (one row per cluster)", fontsize=9)
    axes[1].axis("off")
    fig.tight_layout()
    fig.savefig(sd / "clusters.png", dpi=100)
    plt.close(fig)
    # cluster -> expert gate matrix of each MoCE layer
    layers = moce.moe_layers()
    fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 4), squeeze=False)
    for ax, (blk, layer) in zip(axes[0], layers):
        with torch.no_grad():
            layer.router.eval()
            r = layer.router(torch.zeros(clustering.num_clusters, 1, 1), torch.arange(clustering.num_clusters))
        ax.imshow(r.probs.numpy(), aspect="auto", cmap="viridis")
        ax.set_xlabel("expert")
        ax.set_ylabel("cluster")
        ax.set_title(f"block {blk}: gate probabilities", fontsize=9)
    fig.tight_layout()
    fig.savefig(sd / "cluster_expert.png", dpi=100)
    plt.close(fig)


def _denorm(pred, x, p):
    """Undo the per-patch normalisation of the targets, using the input's patch statistics."""
    t = patchify(x, p)
    return pred * (t.var(-1, keepdim=True) + 1e-6) ** 0.5 + t.mean(-1, keepdim=True)


def _write_report(out: Path, res: dict) -> None:
    lines = ["# MoCE demo report", "",
             f"Seeds {[r['seed'] for r in res['runs']]}, {res['seconds']:.0f} s in total. "
             "Accuracy after fine-tuning on each downstream task (mean ± std over seeds):", "",
             "| task | MAE* | TokenMoE | MoCE |", "|---|---|---|---|"]
    for task, m in res["tasks"].items():
        lines.append(f"| {task} | " + " | ".join(f"{m[k]['mean']:.4f} ± {m[k]['std']:.4f}"
                                                for k in ("MAE*", "TokenMoE", "MoCE")) + " |")
    means = {k: statistics.mean(res["tasks"][t][k]["mean"] for t in res["tasks"]) for k in ("MAE*", "TokenMoE", "MoCE")}
    lines += [f"| **average** | {means['MAE*']:.4f} | {means['TokenMoE']:.4f} | {means['MoCE']:.4f} |", ""]
    p = res.get("params", {})
    lines += ["Parameters: MAE encoder {mae}, TokenMoE {tokenmoe_total}, MoCE (all experts) {moce_total}, "
              "deployed dense model {deployed_dense}.".format(**p) if p else "", ""]
    for r in res["runs"]:
        s = r["seed"]
        lines += [f"## Seed {s}", "", f"Experts in blocks {r['blocks']} (largest MLP gradient under the MAE loss: "
                  + ", ".join(f"{v:.3g}" for v in r["grad_scores"]) + ").", "",
                  "Masked-patch reconstruction loss on held-out pool images (lower is better): "
                  + ", ".join(f"{k} {v:.4f}" for k, v in r["recon"].items()) + ".", "",
                  "Cluster chosen for each task (share of its images): "
                  + ", ".join(f"{t} -> {v['cluster']} ({v['share']:.0%})" for t, v in r["selection"].items()), "",
                  f"![MAE loss](seed{s}/mae_loss.png) ![reconstructions](seed{s}/reconstructions.png)", "",
                  f"![clusters](seed{s}/clusters.png)", "", f"![cluster to expert](seed{s}/cluster_expert.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
