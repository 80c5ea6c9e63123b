"""MoCE analyses beyond the demo, on the demo's data, sizes and transfer protocol.

- **Negative transfer** (MoCE section 3.1, Figure 1a): pre-train MAE on two semantically
  disjoint halves of the pool and on the whole pool, with equal steps, and transfer each
  encoder to every downstream task (linear probe and fine-tuning). The paper's claim: the
  half closer to a task transfers better than the other half, and can beat the whole pool.
- **From scratch** (MoCE appendix A.4, Table 11): cluster the features of a short MAE run,
  then train MoCE from random initialisation on those cluster assignments, against MAE from
  random initialisation with the same number of steps.
- **Ablations** (MoCE Tables 6-9 at small scale): per seed one MAE pre-training, then MoCE
  built from it with one setting changed at a time (number of experts, which blocks get
  experts, number of clusters, without the imbalance or distillation loss), each with the
  same extra steps, deployed and transferred like the demo's MoCE; MAE* is the dense reference.

``visionmoe moce-study negative-transfer|from-scratch|ablations [--quick] [CONFIG] [key=value ...]``
takes the :class:`~visionmoe.recipes.moce_demo.MoCEDemoConfig` fields and writes
``report.md``, ``results.json`` and a figure into ``--out``.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .._utils import atomic_write_bytes, finish_study, fmt_mean_std, mean_std
from ..clustering import ClusterConfig, fit_clusters
from ..data import TensorSplits, load_dataset, make_mixture
from ..eval import extract_features, linear_probe
from ..models import VisionTransformer, count_parameters
from ..moe.placement import by_scores
from .moce import MoCEObjective, build_moce, deploy, select_cluster
from .moce_demo import MoCEDemoConfig
from .moce_pipeline import (
    Stages,
    adapt_all,
    cluster_pool,
    continue_mae,
    finetune,
    grad_scores,
    mae_kwargs,
    subset,
    train_config,
)
from .moce_report import method_table

__all__ = ["HALVES", "ablation_variants", "run_negative_transfer", "run_from_scratch", "run_ablations", "STUDIES"]

#: the two semantically disjoint halves of the demo's pool: strokes and textures vs garments and faces
HALVES = {"digits+textures": ["mnist5k", "textures"], "garments+faces": ["fashion_mnist", "faces"]}
#: the half each task is semantically closer to (digits: strokes, like MNIST)
CLOSER = {"mnist5k": "digits+textures", "digits": "digits+textures", "textures": "digits+textures",
          "fashion_mnist": "garments+faces", "faces": "garments+faces"}


def _tasks(c: MoCEDemoConfig, sources: dict[str, TensorSplits]) -> dict[str, TensorSplits]:
    tasks = {}
    for name in c.task_names:
        s = sources.get(name) or load_dataset(name)
        s = TensorSplits(s.name, *adapt_all(s, c.img_size), s.classes)
        tasks[name] = subset(s, c.finetune_train_limit, c.finetune_test_limit, 0)
    return tasks


def _pool(c: MoCEDemoConfig, sources: dict[str, TensorSplits], names: list[str]) -> TensorSplits:
    """The pre-training images of ``names`` (``per_source`` each, the same for every seed)."""
    return make_mixture([sources[n] for n in names], size=c.img_size, channels=1, per_source=c.per_source,
                        seed=0).as_splits("source")


def _transfer(stages: Stages, backbone, task: TensorSplits, c: MoCEDemoConfig, seed: int, run_dir: Path) -> dict:
    """Linear probe on frozen features and fine-tuning (the demo's protocol) of one backbone."""
    ftr, fte = extract_features(backbone, task.x_train), extract_features(backbone, task.x_test)
    probe = linear_probe(ftr, task.y_train, fte, task.y_test, num_classes=task.num_classes)
    return {"probe": probe, "finetune": finetune(stages, backbone, task, c, seed, run_dir, c.finetune_lrs[0])}


def _run(study: str, c: MoCEDemoConfig, out: str | Path, progress: bool, per_seed_steps: int, seed_fn,
         report_fn, aggregate=None) -> dict:
    from .._utils import study_progress

    if c.threads:
        torch.set_num_threads(c.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(set(c.sources) | {s for h in HALVES.values() for s in h})
    sources = {n: load_dataset(n) for n in names}
    tasks = _tasks(c, sources)
    res: dict = {"study": study, "config": asdict(c), "runs": []}
    t0 = time.perf_counter()
    _, bar = study_progress(study, "steps", progress)
    with bar:
        stages = Stages(bar, per_seed_steps * len(c.seeds))
        for seed in c.seeds:  # results and report after every seed: a stopped run keeps what it finished
            res["runs"].append(seed_fn(stages, c, seed, sources, tasks, out / f"seed{seed}"))
            finish_study(out, res, t0, aggregate or _aggregate, report_fn, bar.console)
    return res


def _aggregate(res: dict) -> None:
    """``summary[protocol][task][model]`` = mean ± std over the finished seeds."""
    runs = res["runs"]
    res["summary"] = {p: {t: {m: mean_std(r["transfer"][t][m][p] for r in runs) for m in runs[0]["transfer"][t]}
                          for t in runs[0]["transfer"]} for p in ("probe", "finetune")}


def _protocol_sections(out: Path, res: dict, stem: str) -> list[str]:
    """Report sections for the linear probe and fine-tuning: a table (mean ± std over seeds,
    the best in bold, the average) and a bar chart ``out/<stem>_<protocol>.png`` each."""
    lines = []
    for protocol, title in (("probe", "Linear probe accuracy (mean ± std over seeds)"),
                            ("finetune", "Fine-tuned accuracy (mean ± std over seeds)")):
        lines += method_table(title, res["summary"][protocol], digits=3, level="###")
        _plot(out / f"{stem}_{protocol}.png", res, protocol, title)
        lines += [f"![{protocol}]({stem}_{protocol}.png)", ""]
    return lines


def _plot(path: Path, res: dict, protocol: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = res["summary"][protocol]
    tasks, models = list(s), list(next(iter(s.values())))
    fig, ax = plt.subplots(figsize=(1.6 * len(tasks) + 2, 3.2))
    w = 0.8 / len(models)
    for i, m in enumerate(models):
        ax.bar([j + i * w for j in range(len(tasks))], [s[t][m]["mean"] for t in tasks], w,
               yerr=[s[t][m]["std"] for t in tasks], label=m, capsize=2)
    ax.set_xticks([j + w * (len(models) - 1) / 2 for j in range(len(tasks))], tasks)
    ax.set_ylabel(f"{protocol} accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------ negative transfer
def _mae(stages: Stages, c: MoCEDemoConfig, seed: int, pool: TensorSplits, steps: int, run_dir: Path,
         label: str, *, trainer: bool = False):
    """MAE from random initialisation; the encoder (and its trainer with ``trainer=True``)."""
    torch.manual_seed(seed)
    enc = VisionTransformer(img_size=c.img_size, in_chans=1, num_classes=0, **c.vit)
    cfg = train_config("mae", steps, c.batch_size, c.mae_lr, seed=seed, warmup_epochs=c.mae_warmup, **mae_kwargs(c))
    t, _ = stages.train(enc, pool, cfg, run_dir, label)
    return (enc, t) if trainer else enc


def _negative_seed(stages: Stages, c: MoCEDemoConfig, seed: int, sources: dict, tasks: dict, sd: Path) -> dict:
    sets = {**HALVES, "whole pool": sorted({s for h in HALVES.values() for s in h})}
    pools = {label: _pool(c, sources, names) for label, names in sets.items()}
    if c.equal_size_pools:  # the same number of images in every set (a random subset, the same for every seed)
        n = min(len(p.x_train) for p in pools.values())
        pools = {label: subset(p, n, None, 0) for label, p in pools.items()}
    run = {"seed": seed, "pretrain_images": {}, "transfer": {t: {} for t in tasks}}
    for label, pool in pools.items():
        run["pretrain_images"][label] = len(pool.x_train)
        tag = label.replace("+", "_").replace(" ", "_")
        enc = _mae(stages, c, seed, pool, c.mae_steps, sd / f"mae_{tag}", f"seed {seed}: MAE on {label}")
        for name, task in tasks.items():
            run["transfer"][name][label] = _transfer(stages, enc, task, c, seed, sd / f"ft_{tag}_{name}")
    return run


def _negative_report(out: Path, res: dict) -> None:
    cfg = res["config"]
    lines = ["# Negative transfer (MoCE Figure 1a)", "",
             f"MAE pre-trained for {cfg['mae_steps']} steps (the same for every set) on "
             f"{', '.join(f'{k} ({v} images)' for k, v in res['runs'][0]['pretrain_images'].items())}; "
             f"{cfg['per_source']} images per source"
             f"{', then every set cut to the smallest one by a random subset' if cfg.get('equal_size_pools') else ''}."
             f" Transfer: linear probe and {cfg['finetune_steps']}-step "
             f"fine-tuning on up to {cfg['finetune_train_limit']} images per task. Seeds "
             f"{[r['seed'] for r in res['runs']]}, {res['seconds'] / 60:.1f} min.", ""]
    lines += _protocol_sections(out, res, "negative_transfer")
    lines += ["### Does the semantically closer half transfer better?", "",
              "| task | closer half | probe: closer − other | fine-tune: closer − other | probe: closer − whole |",
              "|---|---|---|---|---|"]
    for task in res["summary"]["probe"]:
        near = CLOSER.get(task)
        if near is None:
            continue
        far = next(h for h in HALVES if h != near)
        p, f = res["summary"]["probe"][task], res["summary"]["finetune"][task]
        lines.append(f"| {task} | {near} | {p[near]['mean'] - p[far]['mean']:+.3f} | "
                     f"{f[near]['mean'] - f[far]['mean']:+.3f} | {p[near]['mean'] - p['whole pool']['mean']:+.3f} |")
    atomic_write_bytes(out / "report.md", ("\n".join(lines) + "\n").encode())


def run_negative_transfer(c: MoCEDemoConfig | None = None, *, out: str | Path = "runs/moce_negative_transfer",
                          progress: bool = True) -> dict:
    """Pre-train MAE on each half of the pool (:data:`HALVES`) and on the whole pool, and
    transfer each to every task; writes ``report.md`` with the tables and bar charts."""
    c = c or MoCEDemoConfig()
    steps = len(HALVES) + 1
    per_seed = steps * (c.mae_steps + len(c.task_names) * c.finetune_steps)
    return _run("negative transfer", c, out, progress, per_seed, _negative_seed, _negative_report)


# ------------------------------------------------------------------ from scratch
def _scratch_seed(stages: Stages, c: MoCEDemoConfig, seed: int, sources: dict, tasks: dict, sd: Path) -> dict:
    pool = _pool(c, sources, c.sources)
    short = max(1, c.mae_steps // 4)
    probe_enc = _mae(stages, c, seed, pool, short, sd / "mae_short", f"seed {seed}: short MAE ({short} steps)")
    feats = extract_features(probe_enc, pool.x_train)
    clustering = fit_clusters(feats, ClusterConfig(num_clusters=c.num_clusters, batch_size=512, seed=seed,
                                                   center=c.cluster_center), feature_source=f"seed{seed}/short")
    keys_tr = clustering.assign_balanced(feats)
    keys_te = clustering.assign(extract_features(probe_enc, pool.x_test))
    mae = _mae(stages, c, seed, pool, c.mae_steps, sd / "mae", f"seed {seed}: MAE from scratch")
    torch.manual_seed(seed)
    blocks = list(c.blocks) if c.blocks is not None else list(range(c.vit["depth"] - c.moe_blocks, c.vit["depth"]))
    moce = VisionTransformer(img_size=c.img_size, in_chans=1, num_classes=0, **c.vit,
                             moe=dict(num_experts=c.num_experts, top_k=1, placement=blocks, routing="cluster",
                                      num_keys=c.num_clusters, key_dim=c.vit["embed_dim"], renormalize=c.renormalize,
                                      aux_weights={"imbalance": c.imbalance_weight}))
    with torch.no_grad():
        for _, layer in moce.moe_layers():
            layer.router.embed.weight.copy_(clustering.centroids)
    obj = MoCEObjective(moce, probe_enc, distill_weight=0.0, **mae_kwargs(c))  # no teacher from scratch
    _, s_moce = stages.train(moce, pool.with_keys(keys_tr, keys_te),
                             train_config("mae", c.mae_steps, c.batch_size, c.mae_lr, seed=seed,
                                          warmup_epochs=c.mae_warmup, **mae_kwargs(c)),
                             sd / "moce", f"seed {seed}: MoCE from scratch", objective=obj)
    run = {"seed": seed, "short_steps": short, "blocks": blocks, "transfer": {t: {} for t in tasks},
           "moce_recon": s_moce["test_recon_loss"], "selection": {}}
    for name, task in tasks.items():
        sel = select_cluster(probe_enc, clustering, task.x_train)
        run["selection"][name] = {"cluster": sel.cluster, "share": sel.share}
        run["transfer"][name]["MAE (scratch)"] = _transfer(stages, mae, task, c, seed, sd / f"ft_mae_{name}")
        run["transfer"][name]["MoCE (scratch)"] = _transfer(stages, deploy(moce, sel.cluster), task, c, seed,
                                                            sd / f"ft_moce_{name}")
    return run


def _scratch_report(out: Path, res: dict) -> None:
    cfg, r0 = res["config"], res["runs"][0]
    lines = ["# MoCE from scratch (MoCE appendix A.4, Table 11)", "",
             f"MAE and MoCE each trained {cfg['mae_steps']} steps from random initialisation on the demo's pool. "
             f"MoCE routes by the clusters of a short MAE run ({r0['short_steps']} steps, not counted in its "
             f"steps), experts in blocks {r0['blocks']}, {cfg['num_experts']} experts, {cfg['num_clusters']} "
             "clusters, no distillation (there is no pre-trained teacher). Seeds "
             f"{[r['seed'] for r in res['runs']]}, {res['seconds'] / 60:.1f} min.", ""]
    lines += _protocol_sections(out, res, "from_scratch")
    atomic_write_bytes(out / "report.md", ("\n".join(lines) + "\n").encode())


def run_from_scratch(c: MoCEDemoConfig | None = None, *, out: str | Path = "runs/moce_from_scratch",
                     progress: bool = True) -> dict:
    """MoCE trained from scratch on the clusters of a short MAE run vs MAE from scratch with
    equal steps; writes ``report.md`` with tables and bar charts."""
    c = c or MoCEDemoConfig()
    per_seed = max(1, c.mae_steps // 4) + 2 * c.mae_steps + 2 * len(c.task_names) * c.finetune_steps
    return _run("from scratch", c, out, progress, per_seed, _scratch_seed, _scratch_report)


# ------------------------------------------------------------------ ablations
def ablation_variants(c: MoCEDemoConfig) -> dict[str, dict]:
    """The settings the ablation study compares, each as the fields it changes from ``c``
    (MoCE Tables 6-9): experts 1/2/4/8, experts in the first or last two blocks instead of the
    largest-gradient ones, 4/16/32 clusters, without the imbalance or distillation loss.
    Settings equal to ``c`` are left out; ``c`` itself comes first as ``"as configured"``."""
    depth = c.vit["depth"]
    cands = {f"{e} expert{'s' * (e > 1)}": {"num_experts": e} for e in (1, 2, 4, 8)}
    cands |= {"first two blocks": {"blocks": [0, 1]}, "last two blocks": {"blocks": [depth - 2, depth - 1]}}
    cands |= {f"{k} clusters": {"num_clusters": k} for k in (4, 16, 32)}
    cands |= {"no imbalance loss": {"imbalance_weight": 0.0}, "no distillation loss": {"distill_weight": 0.0}}
    out = {"as configured": {}}
    for label, change in cands.items():
        if any(getattr(c, k) != v for k, v in change.items()):
            out[label] = change
    return out


def _ablation_seed(stages: Stages, c: MoCEDemoConfig, seed: int, sources: dict, tasks: dict, sd: Path) -> dict:
    pool = _pool(c, sources, c.sources)
    enc, mae = _mae(stages, c, seed, pool, c.mae_steps, sd / "mae", f"seed {seed}: MAE pre-training", trainer=True)
    feats = extract_features(enc, pool.x_train)
    scores = grad_scores(enc, mae, pool, c)
    clusterings: dict[int, tuple] = {}  # num_clusters -> (clustering, train keys, test keys, cluster per task)
    run = {"seed": seed, "grad_scores": scores, "variants": {}, "transfer": {t: {} for t in tasks}}
    # the dense reference: MAE* (the same extra steps, no experts)
    star = copy.deepcopy(enc)
    continue_mae(stages, c, seed, mae, star, pool, sd / "mae_star", f"seed {seed}: MAE*")
    for name, task in tasks.items():
        run["transfer"][name]["MAE*"] = _transfer(stages, star, task, c, seed, sd / f"ft_mae_star_{name}")
    for i, (label, change) in enumerate(ablation_variants(c).items()):
        v = replace(c, **change)
        if v.num_clusters not in clusterings:
            clustering, keys_tr, keys_te = cluster_pool(enc, feats, pool, v.num_clusters, c, seed)
            picks = {name: select_cluster(enc, clustering, task.x_train).cluster for name, task in tasks.items()}
            clusterings[v.num_clusters] = clustering, keys_tr, keys_te, picks
        clustering, keys_tr, keys_te, picks = clusterings[v.num_clusters]
        blocks = list(v.blocks) if v.blocks is not None else by_scores(scores, v.moe_blocks)
        moce = build_moce(enc, clustering, blocks=blocks, num_experts=v.num_experts, noise=0.01, seed=seed,
                          imbalance_weight=v.imbalance_weight, renormalize=v.renormalize)
        _, summary = continue_mae(stages, v, seed, mae, moce, pool.with_keys(keys_tr, keys_te), sd / f"moce_{i}",
                               f"seed {seed}: MoCE, {label}", MoCEObjective, teacher=enc,
                               distill_weight=v.distill_weight)
        run["variants"][label] = {"change": change, "blocks": blocks, "recon": summary["test_recon_loss"],
                                  "params": count_parameters(moce)["total"], "clusters": picks}
        for name, task in tasks.items():
            run["transfer"][name][label] = _transfer(stages, deploy(moce, picks[name]), task, c, seed,
                                                     sd / f"ft_moce_{i}_{name}")
    return run


def _ablation_aggregate(res: dict) -> None:
    """:func:`_aggregate`, and ``averages[protocol][setting]``: mean ± std over seeds of the
    per-seed average over tasks."""
    _aggregate(res)
    runs = res["runs"]
    tasks = list(runs[0]["transfer"])
    res["averages"] = {p: {m: mean_std(statistics.mean(r["transfer"][t][m][p] for t in tasks) for r in runs)
                           for m in runs[0]["transfer"][tasks[0]]} for p in ("probe", "finetune")}


def _ablation_report(out: Path, res: dict) -> None:
    """Rows are settings, columns tasks and the average, per protocol; the average's std is
    over seeds of the per-seed average. Also a bar chart of the averages."""
    cfg, runs = res["config"], res["runs"]
    tasks = list(runs[0]["transfer"])
    models = list(runs[0]["transfer"][tasks[0]])
    lines = ["# MoCE ablations (MoCE Tables 6-9 at small scale)", "",
             f"One MAE pre-training per seed ({cfg['mae_steps']} steps); MAE* and every MoCE setting then get the "
             f"same {cfg['extra_steps']} extra steps from it. MoCE as configured: {cfg['num_experts']} experts, "
             f"{cfg['num_clusters']} clusters, {cfg['moe_blocks']} blocks by MAE-loss gradient "
             f"(seed 0: {runs[0]['variants']['as configured']['blocks']}), imbalance weight "
             f"{cfg['imbalance_weight']}, distillation weight {cfg['distill_weight']}; each other row changes one "
             f"setting. Transfer: linear probe and {cfg['finetune_steps']}-step fine-tuning, the demo's protocol. "
             f"Seeds {[r['seed'] for r in runs]}, {res['seconds'] / 60:.1f} min.", ""]
    avg = res["averages"]
    for protocol, title in (("probe", "Linear probe accuracy"), ("finetune", "Fine-tuned accuracy")):
        best = max(models, key=lambda m: avg[protocol][m]["mean"])
        lines += [f"### {title} (mean ± std over seeds)", "",
                  "| setting | " + " | ".join(tasks) + " | average |", "|---" * (len(tasks) + 2) + "|"]
        for m in models:
            cells = [fmt_mean_std(res["summary"][protocol][t][m], 3) for t in tasks]
            a = fmt_mean_std(avg[protocol][m], 3)
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {f'**{a}**' if m == best else a} |")
        lines.append("")
    lines += ["### Size and reconstruction", "", "| setting | parameters (MoE model) | test reconstruction loss |",
              "|---|---|---|"]
    for m in models[1:]:
        recon = mean_std(r["variants"][m]["recon"] for r in runs)
        lines.append(f"| {m} | {runs[0]['variants'][m]['params']:,} | {fmt_mean_std(recon)} |")
    _plot_averages(out / "ablations.png", avg)
    lines += ["", "![averages](ablations.png)", ""]
    atomic_write_bytes(out / "report.md", ("\n".join(lines) + "\n").encode())


def _plot_averages(path: Path, avg: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(avg["probe"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 0.35 * len(models) + 1.2), sharey=True)
    for ax, (protocol, a) in zip(axes, avg.items()):
        means = [a[m]["mean"] for m in models]
        ax.barh(range(len(models)), means, xerr=[a[m]["std"] for m in models], capsize=2,
                color=["0.6"] + ["C0"] * (len(models) - 1))
        ax.set_xlim(min(means) - 0.05, max(means) + 0.03)
        ax.set_title(f"{protocol}: average over tasks", fontsize=9)
    axes[0].set_yticks(range(len(models)), models, fontsize=8)
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_ablations(c: MoCEDemoConfig | None = None, *, out: str | Path = "runs/moce_ablations",
                  progress: bool = True) -> dict:
    """MoCE with one setting changed at a time (:func:`ablation_variants`) against the MAE*
    reference, all from one MAE pre-training per seed; writes ``report.md`` and a bar chart."""
    c = c or MoCEDemoConfig()
    per_model = c.extra_steps + len(c.task_names) * c.finetune_steps
    per_seed = c.mae_steps + (1 + len(ablation_variants(c))) * per_model
    return _run("ablations", c, out, progress, per_seed, _ablation_seed, _ablation_report, _ablation_aggregate)


STUDIES = {"negative-transfer": run_negative_transfer, "from-scratch": run_from_scratch, "ablations": run_ablations}
