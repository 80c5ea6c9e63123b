"""The MoCE pipeline end to end on bundled real images, with MAE* and TokenMoE baselines.

1. Pre-training pool: a mixture of real sources (Fashion-MNIST, MNIST, textures, faces),
   all 28x28 grey; the downstream tasks are sources (Fashion-MNIST, MNIST, textures) plus
   scikit-learn's digits, which pre-training never saw (faces, 50 test images, is too small
   to rank methods and stays in the pool only).
2. Dense MAE pre-training of a CPU-sized ViT on the pool.
3. Unit-norm MAE features -> balanced Sinkhorn-Knopp clustering.
4. Blocks for experts: the MLPs with the largest MAE-loss gradients.
5. Equal extra compute for three continuations: MAE* (the dense MAE trained on), TokenMoE
   (token-routed noisy top-1 experts, importance + load losses) and MoCE (cluster-conditional
   experts, imbalance + distillation losses).
6. Transfer to every task: MAE* and TokenMoE fine-tune the whole model; MoCE assigns the
   task's images to clusters, keeps the largest cluster's experts as a dense ViT and
   fine-tunes that. One protocol for every method (AdamW, warm-up, cosine, label smoothing,
   layer-wise lr decay for pre-trained encoders), beside two baselines anyone can compute on
   the same images: a linear probe on the raw pixels and the same fine-tune from random
   initialisation.
7. A markdown report with plots, the per-task accuracy table over seeds, and seed-paired
   differences with 95% confidence intervals; an encoder that does not beat the random
   initialisation is flagged.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..analysis import class_expert_table, dominant_expert_share
from ..data import TensorSplits, load_dataset, make_mixture
from ..eval import extract_features
from ..models import VisionTransformer, count_parameters
from ..moe.placement import by_scores
from ..moe.upcycle import upcycle_state_dict
from ..objectives import MAEObjective
from .moce import (
    MoCEObjective,
    build_moce,
    build_sdr,
    deploy,
    distinct_candidates,
    expert_choices,
    score_candidates,
    select_cluster,
)
from .moce_pipeline import (
    Stages,
    adapt_all,
    cluster_pool,
    continue_mae,
    finetune,
    finetune_tasks,
    grad_scores,
    pixel_probe,
    pretrain_dense,
    progress_bar,
    subset,
    val_split,
)
from .moce_report import (
    paired_comparisons,
    plot_routing,
    reconstruction,
    save_plots,
    summary_table,
    write_report,
)

__all__ = ["MoCEDemoConfig", "run_moce_demo", "pixel_probe", "pretrain_dense", "progress_bar"]


@dataclass
class MoCEDemoConfig:
    """Sizes and budgets of the demo (defaults: about 45 minutes on 2 CPU cores).

    ``shared_mae``: one dense MAE pre-training (with the first seed) for every seed; the seeds
    then vary the clustering, the extra steps, the fine-tuning and the random-init baseline
    (as in the paper, where every method continues from one MAE checkpoint). ``False``: one
    MAE per seed (3.3 more minutes a seed).

    Ablations are plain fields: ``num_experts``, ``num_clusters``, ``blocks`` (explicit MoE
    blocks; default: the ``moe_blocks`` MLPs with the largest MAE-loss gradient),
    ``imbalance_weight`` / ``distill_weight`` (0 switches a loss off). ``renormalize``: the
    top-1 combine weight is 1 (TokenMoE and MoCE start exactly as the MAE encoder; with
    ``False`` the expert output is scaled by its gate probability, eq. 1 as written).
    ``cluster_center``: subtract the mean unit feature before clustering and assignment (with
    the paper's plain cosine, nearest-centroid assignment sent 98-100% of a downstream set to
    one "hub" cluster in our runs, so every task deployed the same experts).
    ``extra_lr_scale``: lr of the equal-step continuations relative to ``mae_lr`` (paper 0.1 for
    a long continuation; at 150 steps 0.1 leaves the three models within 0.0003 of each other
    in reconstruction loss, so the demo uses 1). ``tasks`` are the downstream classification
    sets (``None``: every pre-training source plus ``digits``). ``finetune_lrs`` with more than one value runs a
    learning-rate search on a validation split (first seed) for every task and method.
    Fine-tuning (every method and the random-initialisation baseline alike): ``finetune_optim``
    (a timm optimizer) with ``finetune_weight_decay``, linear warm-up over ``finetune_warmup`` of
    the steps, cosine decay, ``label_smoothing``, augmentation ``finetune_augment`` (``auto``:
    per task, :data:`~visionmoe.recipes.moce_pipeline.TASK_AUGMENT`; or one of ``none``,
    ``shift``, ``flip``, ``basic``... for every task) and, for pre-trained encoders only, layer-wise lr decay
    ``finetune_layer_decay`` (timm's). ``baselines``: also report a linear probe on raw pixels
    and the same fine-tune from random initialisation.
    ``compare_selection`` adds the paper's other expert-selection methods (first seed).
    ``sdr`` adds the SDR(ViT) baseline (MoCE Table 3; :func:`~visionmoe.recipes.moce.build_sdr`):
    the same clusters as data subsets, each sent to a random fixed expert, the same extra
    steps, and per task a brute-force search over its distinct subnets (``selection_probe_steps``
    fine-tuning steps each on a validation split).
    """

    sources: list[str] = field(default_factory=lambda: ["fashion_mnist", "mnist5k", "textures", "faces"])
    tasks: list[str] | None = field(default_factory=lambda: ["fashion_mnist", "mnist5k", "textures", "digits"])
    per_source: int = 2000
    img_size: int = 28
    vit: dict = field(default_factory=lambda: dict(patch_size=7, embed_dim=64, depth=6, num_heads=4))
    mae_steps: int = 5000
    mae_lr: float = 1e-3
    shared_mae: bool = True
    mae_warmup: float = 0.5
    extra_steps: int = 150
    extra_lr_scale: float = 1.0
    finetune_steps: int = 750
    finetune_batch_size: int = 64
    finetune_lrs: list[float] = field(default_factory=lambda: [3e-3])
    finetune_optim: str = "adamw"
    finetune_weight_decay: float = 0.05
    finetune_layer_decay: float | None = None
    finetune_warmup: float = 0.1
    label_smoothing: float = 0.1
    finetune_augment: str = "auto"
    baselines: bool = True
    finetune_train_limit: int = 1000
    finetune_test_limit: int | None = 1000
    num_clusters: int = 16
    cluster_center: bool = True
    num_experts: int = 4
    moe_blocks: int = 2
    blocks: list[int] | None = None
    imbalance_weight: float = 0.01
    distill_weight: float = 0.01
    renormalize: bool = True
    batch_size: int = 128
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    compare_selection: bool = False
    selection_probe_steps: int = 30
    sdr: bool = False
    equal_size_pools: bool = False
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.num_experts < 1 or self.num_clusters < 1:
            raise ValueError("num_experts and num_clusters must be >= 1")
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        if not self.finetune_lrs:
            raise ValueError("finetune_lrs must list at least one learning rate")
        kinds = ("auto", "none", "basic", "flip", "shift", "rrc")
        if self.finetune_augment not in kinds:
            raise ValueError(f"finetune_augment={self.finetune_augment!r} is not an augmentation: use one of "
                             f"{', '.join(kinds)} (auto: per task, shifts for digits, flips for clothes)")

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks) if self.tasks is not None else [*self.sources, "digits"]

    @classmethod
    def quick(cls) -> MoCEDemoConfig:
        """About three minutes: the demo's model, a shorter MAE, two tasks (MNIST and digits), one seed."""
        return cls(per_source=1000, mae_steps=1500, extra_steps=30, finetune_steps=300, num_clusters=8,
                   tasks=["mnist5k", "digits"], seeds=[0], finetune_augment="none")

    @classmethod
    def from_yaml(cls, path: str | Path | None = None, overrides: list[str] | None = None,
                  *, quick: bool = False) -> MoCEDemoConfig:
        """Defaults (or :meth:`quick`), then a YAML file's keys, then ``key=value`` overrides;
        unknown keys and wrong types are refused with a suggestion."""
        from .common import study_config

        return study_config(cls, overrides, quick=quick, path=path)


METHODS = ("MAE*", "TokenMoE", "MoCE")


def _methods(c: MoCEDemoConfig) -> tuple[str, ...]:
    return (*METHODS, "SDR") if c.sdr else METHODS


def _total_steps(c: MoCEDemoConfig) -> int:
    methods = _methods(c)
    ft = (len(methods) + int(c.baselines)) * len(c.task_names) * c.finetune_steps
    per_seed = len(methods) * c.extra_steps + ft
    search = ft * len(c.finetune_lrs) if len(c.finetune_lrs) > 1 else 0
    mae = c.mae_steps * (1 if c.shared_mae else len(c.seeds))
    return per_seed * len(c.seeds) + search + mae


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
    sources = [load_dataset(n) for n in c.sources]
    by_name = {s.name: s for s in sources}
    tasks = {}
    for name in c.task_names:
        s = by_name.get(name) or load_dataset(name)
        s = TensorSplits(s.name, *adapt_all(s, c.img_size), s.classes)
        tasks[name] = subset(s, c.finetune_train_limit, c.finetune_test_limit, 0)
    mix = make_mixture(sources, size=c.img_size, channels=1, per_source=c.per_source, seed=0)
    pool = mix.as_splits("source")
    console.print(f"[bold]MoCE demo[/]: pre-training pool of {len(pool.x_train)} images from {mix.sources}; "
                  f"downstream tasks {list(tasks)}; seeds {c.seeds}")
    results: dict = {"config": asdict(c), "tasks": {}, "runs": [], "lr": {}}
    with progress_bar(console=console, disable=not progress) as bar:
        stages = Stages(bar, _total_steps(c))
        shared: dict = {}  # the dense MAE when shared_mae
        for i, seed in enumerate(c.seeds):
            run = _run_seed(stages, c, seed, mix, tasks, out, results, first=i == 0, console=bar.console, shared=shared)
            results["runs"].append(run)
            results["seconds"] = time.perf_counter() - t_start
            _write_results(out, results)  # after every seed: a stopped run keeps what it finished
    console.print(summary_table(results))
    console.print(f"report: {out / 'report.md'} ({results['seconds']:.0f} s)")
    return results


def _write_results(out: Path, results: dict) -> None:
    """Aggregate the finished seeds (mean ± std per task and method) and write
    ``results.json`` and ``report.md`` atomically."""
    from .._utils import atomic_write_bytes, mean_std

    for key, field_ in (("tasks", "acc"), ("probe", "probe"), ("baselines", "baselines")):
        if field_ not in results["runs"][0]:
            continue
        results[key] = {}
        for name in results["runs"][0][field_]:
            results[key][name] = {}
            for method in results["runs"][0][field_][name]:
                results[key][name][method] = mean_std([r[field_][name][method] for r in results["runs"]])
    results["paired"] = paired_comparisons(results["runs"])
    atomic_write_bytes(out / "results.json", json.dumps(results, indent=2).encode())
    write_report(out, results)


#: the paper's claims (MoCE Table 2) and the baseline every pre-trained encoder should beat:
#: (a, b) means "a is better than b"
def _run_seed(stages: Stages, c: MoCEDemoConfig, seed: int, mix, tasks: dict, out: Path,
              results: dict, *, first: bool, console, shared: dict) -> dict:
    pool = mix.as_splits("source")
    torch.manual_seed(seed)
    sd = out / f"seed{seed}"
    vit_args = dict(img_size=c.img_size, in_chans=1, num_classes=0, **c.vit)
    timings: dict[str, float] = {}
    # 2. dense MAE pre-training (once for every seed with shared_mae)
    if c.shared_mae and "dense" in shared:
        enc, mae, mae_curve = shared["dense"]
        enc = copy.deepcopy(enc)
    else:
        t0 = time.perf_counter()
        run_dir = out / "mae" if c.shared_mae else sd / "mae"
        enc, mae, mae_curve = pretrain_dense(stages, c, seed, pool, run_dir, f"seed {seed}: MAE pre-training", console)
        timings["mae"] = time.perf_counter() - t0
        if c.shared_mae:
            shared["dense"] = (copy.deepcopy(enc), mae, mae_curve)
    # 3. balanced clustering of unit-norm MAE features
    t0 = time.perf_counter()
    feats = extract_features(enc, pool.x_train)
    clustering, keys_tr, keys_te = cluster_pool(enc, feats, pool, c.num_clusters, c, seed)
    clustering.save(sd / "clusters.safetensors")
    timings["clustering"] = time.perf_counter() - t0
    # 4. placement by gradient magnitude under the MAE loss
    scores = grad_scores(enc, mae, pool, c)
    blocks = list(c.blocks) if c.blocks is not None else by_scores(scores, c.moe_blocks)

    # 5. equal extra compute for MAE*, TokenMoE and MoCE (base lr x extra_lr_scale, paper 0.1)
    def run_extra(model, name, data=pool, objective_cls=MAEObjective, **kw):
        t0 = time.perf_counter()
        trainer, summary = continue_mae(stages, c, seed, mae, model, data, sd / name, f"seed {seed}: {name}",
                                        objective_cls, **kw)
        timings[name] = time.perf_counter() - t0
        return trainer, summary

    mae_star = copy.deepcopy(enc)
    t_star, s_star = run_extra(mae_star, "mae_star")
    token = VisionTransformer(moe=dict(num_experts=c.num_experts, top_k=1, placement=blocks, noise_std=1.0,
                                       renormalize=c.renormalize), **vit_args)
    token.load_state_dict(upcycle_state_dict(enc.state_dict(), blocks, c.num_experts, noise=0.01, seed=seed),
                          strict=False)
    t_tok, s_tok = run_extra(token, "tokenmoe")
    moce = build_moce(enc, clustering, blocks=blocks, num_experts=c.num_experts, noise=0.01, seed=seed,
                      imbalance_weight=c.imbalance_weight, renormalize=c.renormalize)
    t_moce, s_moce = run_extra(moce, "moce", data=pool.with_keys(keys_tr, keys_te), objective_cls=MoCEObjective,
                             teacher=enc, distill_weight=c.distill_weight)
    sdr = None
    if c.sdr:  # SDR(ViT): the same subsets (clusters), each to a random fixed expert, the same extra steps
        sdr = build_sdr(enc, clustering, blocks=blocks, num_experts=c.num_experts, noise=0.01, seed=seed)
        t_sdr, s_sdr = run_extra(sdr, "sdr", data=pool.with_keys(keys_tr, keys_te),
                                    objective_cls=MoCEObjective, teacher=enc, distill_weight=c.distill_weight)
    sizes = torch.bincount(keys_tr, minlength=c.num_clusters)
    run = {"seed": seed, "blocks": blocks, "grad_scores": scores, "cluster_sizes": sizes.tolist(),
           "mae_loss": mae_curve,
           "recon": {"MAE*": s_star["test_recon_loss"], "TokenMoE": s_tok["test_recon_loss"],
                     "MoCE": s_moce["test_recon_loss"]},
           "tokenmoe_routing": s_tok["routing"], "moce_routing": s_moce["routing"], "acc": {}, "selection": {},
           "expert_choices": {str(k): v for k, v in expert_choices(moce).items()}}
    # reconstruction PSNR per downstream task (MoCE Fig. 3d) and class-by-expert routing (Fig. 3a/3c)
    cont = {"MAE*": (t_star, None), "TokenMoE": (t_tok, None), "MoCE": (t_moce, clustering)}
    if sdr is not None:
        run["recon"]["SDR"] = s_sdr["test_recon_loss"]
        cont["SDR"] = (t_sdr, clustering)
    rec = {name: {m: reconstruction(t.objective, t.model, task.x_test[:512], enc, cl) for m, (t, cl) in cont.items()}
           for name, task in tasks.items()}
    run["psnr"] = {name: {m: v[0] for m, v in d.items()} for name, d in rec.items()}
    run["recon_task"] = {name: {m: v[1] for m, v in d.items()} for name, d in rec.items()}
    fine_y = mix.y_test
    tables = {"TokenMoE": class_expert_table(token, pool.x_test, fine_y, len(mix.classes)),
              "MoCE": class_expert_table(moce, pool.x_test, fine_y, len(mix.classes), routing_key=keys_te)}
    run["collapse"] = {m: {str(b): dominant_expert_share(t) for b, t in tb.items()} for m, tb in tables.items()}
    # 6. transfer: pick each task's cluster, deploy a dense ViT, fine-tune; baselines fine-tune as is
    backbones = _deploy_per_task(stages, c, seed, run, tasks, enc, clustering, sizes, sd,
                                 {"MAE*": mae_star, "TokenMoE": token, "MoCE": moce, "SDR": sdr})
    finetune_tasks(stages, c, seed, run, results, tasks, backbones, sd, vit_args, first=first, console=console)
    if first and c.compare_selection:
        lrs = {name: results["lr"].get(name, {}).get("MoCE", {}).get("chosen", c.finetune_lrs[0]) for name in tasks}
        run["selection_methods"] = _compare_selection(stages, c, seed, moce, sizes, tasks, run, sd, lrs)
    results["params"] = {"mae": count_parameters(enc)["total"], "tokenmoe_total": count_parameters(token)["total"],
                         "moce_total": count_parameters(moce)["total"],
                         "deployed_dense": count_parameters(backbones[next(iter(tasks))]["MoCE"])["total"]}
    if "speed" not in results:
        results["speed"] = _speed(enc, moce, token, c)
    run["timings_s"] = timings
    save_plots(sd, mae, enc, moce, clustering, pool, keys_tr, c, tasks=run["selection"])
    plot_routing(sd / "routing.png", tables, mix)
    return run


def _deploy_per_task(stages: Stages, c: MoCEDemoConfig, seed: int, run: dict, tasks: dict, enc, clustering,
                     sizes: Tensor, sd: Path, models: dict) -> dict:
    """Each task's backbone per method: MAE* and TokenMoE as they are, MoCE (and SDR) deployed as a
    dense ViT from the cluster the task's images fall in (SDR: the subset its search picks)."""
    backbones = {}
    for name, task in tasks.items():
        t0 = time.perf_counter()
        sel = select_cluster(enc, clustering, task.x_train)
        run["selection"][name] = {"cluster": sel.cluster, "share": sel.share, "histogram": sel.histogram.tolist(),
                                  "seconds": time.perf_counter() - t0}
        backbones[name] = {"MAE*": models["MAE*"], "TokenMoE": models["TokenMoE"],
                           "MoCE": deploy(models["MoCE"], sel.cluster)}
        if models["SDR"] is not None:
            pick = _sdr_search(stages, c, seed, models["SDR"], sizes, task, sd, name)
            run.setdefault("sdr_search", {})[name] = pick
            backbones[name]["SDR"] = deploy(models["SDR"], pick["picked"])
    return backbones


def _sdr_search(stages: Stages, c: MoCEDemoConfig, seed: int, sdr: VisionTransformer, sizes: Tensor,
                task: TensorSplits, sd: Path, name: str) -> dict:
    """SDR's brute-force transfer: a short fine-tune of every distinct subnet on a validation
    split of the task; the best one is deployed."""
    cands = distinct_candidates(sdr, sizes)
    stages.add(len(cands) * c.selection_probe_steps)
    val = val_split(task, seed)
    t0 = time.perf_counter()
    accs = {cl: finetune(stages, deploy(sdr, cl), val, c, seed, sd / f"sdr_search_{name}_{cl}", c.finetune_lrs[0],
                          steps=c.selection_probe_steps) for cl in cands}
    return {"val_acc": {str(k): v for k, v in accs.items()}, "picked": max(accs, key=accs.get),
            "seconds": time.perf_counter() - t0}


def _compare_selection(stages: Stages, c: MoCEDemoConfig, seed: int, moce: VisionTransformer, sizes: Tensor,
                       tasks: dict, run: dict, sd: Path, lrs: dict[str, float]) -> dict:
    """The paper's other ways to pick experts for a task (MoCE Table 5), on the candidates with
    distinct expert choices: k-NN accuracy and LogME of frozen features, early-stop search
    (short fine-tunes scored on a validation split) and exhaustive search (full fine-tunes:
    best and worst test accuracy)."""
    cands = distinct_candidates(moce, sizes)
    choice = expert_choices(moce)
    rep = {k: next(r for r in cands if choice[r] == choice[k]) for k in choice}  # cluster -> its candidate
    out = {"candidates": cands}
    stages.add(len(tasks) * len(cands) * (c.finetune_steps + c.selection_probe_steps))
    for name, task in tasks.items():
        lr = lrs[name]
        secs = {"largest cluster (MoCE)": run["selection"][name]["seconds"]}
        t0 = time.perf_counter()
        full = {cl: finetune(stages, deploy(moce, cl), task, c, seed, sd / f"sel_full_{name}_{cl}", lr)
                for cl in cands}
        secs["exhaustive"] = time.perf_counter() - t0
        val = val_split(task, seed)
        t0 = time.perf_counter()
        early = {cl: finetune(stages, deploy(moce, cl), val, c, seed, sd / f"sel_early_{name}_{cl}", lr,
                               steps=c.selection_probe_steps) for cl in cands}
        secs["early-stop search"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        knn = score_candidates(moce, cands, task.x_train, task.y_train, method="knn", seed=seed)
        secs["k-NN"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        lme = score_candidates(moce, cands, task.x_train, task.y_train, method="logme", seed=seed)
        secs["LogME"] = time.perf_counter() - t0
        picks = {"largest cluster (MoCE)": rep[run["selection"][name]["cluster"]],
                 "k-NN": max(knn, key=knn.get), "LogME": max(lme, key=lme.get),
                 "early-stop search": max(early, key=early.get)}
        out[name] = {"test_acc": {str(k): v for k, v in full.items()}, "knn": knn, "logme": lme, "early": early,
                     "picked": {m: {"cluster": cl, "test_acc": full[cl]} for m, cl in picks.items()},
                     "exhaustive_best": max(full.values()), "exhaustive_worst": min(full.values()),
                     "seconds": secs}
    return out


@torch.no_grad()
def _speed(enc: VisionTransformer, moce: VisionTransformer, token: VisionTransformer, c: MoCEDemoConfig,
           batch: int = 256, reps: int = 5) -> dict:
    """Inference images/s of the deployed dense ViT, the MoCE MoE (keyed), TokenMoE and the dense
    encoder (:func:`visionmoe.sweep.inference_throughput`, one run each)."""
    from ..sweep import inference_throughput

    x = torch.rand(batch, 1, c.img_size, c.img_size)
    key = torch.zeros(batch, dtype=torch.long)
    models = {"deployed dense ViT": (deploy(moce, 0), {}), "MoCE (all experts)": (moce, {"routing_key": key}),
              "TokenMoE": (token, {}), "MAE encoder (dense)": (enc, {})}
    return {name: inference_throughput(m, x, reps, **kw) for name, (m, kw) in models.items()}


