"""Two MoCE analyses beyond the demo, on the demo's data, sizes and transfer protocol.

- **Negative transfer** (MoCE section 3.1, Figure 1a): pre-train MAE on two semantically
  disjoint halves of the pool and on the whole pool, with equal steps, and transfer each
  encoder to every downstream task (linear probe and fine-tuning). The paper's claim: the
  half closer to a task transfers better than the other half, and can beat the whole pool.
- **From scratch** (MoCE appendix A.4, Table 11): cluster the features of a short MAE run,
  then train MoCE from random initialisation on those cluster assignments, against MAE from
  random initialisation with the same number of steps.

``visionmoe moce-study negative-transfer|from-scratch [--quick] [CONFIG] [key=value ...]``
takes the :class:`~visionmoe.recipes.moce_demo.MoCEDemoConfig` fields and writes
``report.md``, ``results.json`` and a figure into ``--out``.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from .._utils import atomic_write_bytes, finish_study, mean_std
from ..clustering import ClusterConfig, fit_clusters
from ..data import TensorSplits, load_dataset, make_mixture
from ..eval import extract_features, linear_probe
from ..models import VisionTransformer
from .moce import MoCEObjective, deploy, select_cluster
from .moce_demo import (
    MoCEDemoConfig,
    _adapt_all,
    _cfg,
    _finetune,
    _mae_kwargs,
    _method_table,
    _Stages,
    _subset,
)

__all__ = ["HALVES", "run_negative_transfer", "run_from_scratch", "STUDIES"]

#: the two semantically disjoint halves of the demo's pool: strokes and textures vs garments and faces
HALVES = {"digits+textures": ["mnist5k", "textures"], "garments+faces": ["fashion_mnist", "faces"]}
#: the half each task is semantically closer to (digits: strokes, like MNIST)
CLOSER = {"mnist5k": "digits+textures", "digits": "digits+textures", "textures": "digits+textures",
          "fashion_mnist": "garments+faces", "faces": "garments+faces"}


def _tasks(c: MoCEDemoConfig, sources: dict[str, TensorSplits]) -> dict[str, TensorSplits]:
    tasks = {}
    for name in c.task_names:
        s = sources.get(name) or load_dataset(name)
        s = TensorSplits(s.name, *_adapt_all(s, c.img_size), s.classes)
        tasks[name] = _subset(s, c.finetune_train_limit, c.finetune_test_limit, 0)
    return tasks


def _transfer(stages: _Stages, backbone, task: TensorSplits, c: MoCEDemoConfig, seed: int, run_dir: Path) -> dict:
    """Linear probe on frozen features and fine-tuning (the demo's protocol) of one backbone."""
    ftr, fte = extract_features(backbone, task.x_train), extract_features(backbone, task.x_test)
    probe = linear_probe(ftr, task.y_train, fte, task.y_test, num_classes=task.num_classes)
    return {"probe": probe, "finetune": _finetune(stages, backbone, task, c, seed, run_dir, c.finetune_lrs[0])}


def _run(study: str, c: MoCEDemoConfig, out: str | Path, progress: bool, per_seed_steps: int, seed_fn,
         report_fn) -> dict:
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
        stages = _Stages(bar, per_seed_steps * len(c.seeds))
        for seed in c.seeds:  # results and report after every seed: a stopped run keeps what it finished
            res["runs"].append(seed_fn(stages, c, seed, sources, tasks, out / f"seed{seed}"))
            finish_study(out, res, t0, _aggregate, report_fn, bar.console)
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
        lines += _method_table(title, res["summary"][protocol], digits=3, level="###")
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
def _mae(stages: _Stages, c: MoCEDemoConfig, seed: int, pool: TensorSplits, steps: int, run_dir: Path,
         label: str) -> VisionTransformer:
    torch.manual_seed(seed)
    enc = VisionTransformer(img_size=c.img_size, in_chans=1, num_classes=0, **c.vit)
    stages.train(enc, pool, _cfg("mae", steps, c.batch_size, c.mae_lr, seed=seed, **_mae_kwargs(c)), run_dir, label)
    return enc


def _negative_seed(stages: _Stages, c: MoCEDemoConfig, seed: int, sources: dict, tasks: dict, sd: Path) -> dict:
    sets = {**HALVES, "whole pool": sorted({s for h in HALVES.values() for s in h})}
    run = {"seed": seed, "pretrain_images": {}, "transfer": {t: {} for t in tasks}}
    for label, names in sets.items():
        pool = make_mixture([sources[n] for n in names], size=c.img_size, channels=1, per_source=c.per_source,
                            seed=0).as_splits("source")
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
             f"{cfg['per_source']} images per source. Transfer: linear probe and {cfg['finetune_steps']}-step "
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
def _scratch_seed(stages: _Stages, c: MoCEDemoConfig, seed: int, sources: dict, tasks: dict, sd: Path) -> dict:
    mix = make_mixture([sources[n] for n in c.sources], size=c.img_size, channels=1, per_source=c.per_source,
                       seed=0)
    pool = mix.as_splits("source")
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
    obj = MoCEObjective(moce, probe_enc, distill_weight=0.0, **_mae_kwargs(c))  # no teacher from scratch
    _, s_moce = stages.train(moce, pool.with_keys(keys_tr, keys_te),
                             _cfg("mae", c.mae_steps, c.batch_size, c.mae_lr, seed=seed, **_mae_kwargs(c)),
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


STUDIES = {"negative-transfer": run_negative_transfer, "from-scratch": run_from_scratch}
