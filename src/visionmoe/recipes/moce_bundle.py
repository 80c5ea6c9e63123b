"""MoCE as a product: pre-train once into a *bundle*, then deploy a dense ViT for anyone's task.

``visionmoe moce pretrain`` runs the MoCE demo's pre-training stages (dense MAE on a pool of
images, balanced clustering of its features, experts placed by MAE-loss gradient, the MoCE
continuation with the imbalance and distillation losses) and writes one folder::

    bundle/
      bundle.json          format, blocks, experts, clusters, preprocessing, the pool, the MAE loss
      encoder.safetensors  the dense MAE encoder (it computes the features the clusters live in)
      clusters.safetensors the centroids (visionmoe.clustering.Clustering)
      moce.safetensors     the MoCE model (cluster-conditional experts)

``visionmoe moce deploy BUNDLE --data image_folder root=DIR`` assigns the task's training images
to clusters, picks experts (``cluster``: the largest cluster, MoCE's rule; ``knn`` / ``logme``:
frozen-feature scores of every distinct expert choice; ``early-stop``: short fine-tunes scored on
a validation split), extracts the plain dense ViT (timm keys), checks it against the MoCE model
and the dense encoder (outputs, parameters, speed), and writes the dense checkpoint, a
``train.yaml`` that fine-tunes it on the folder, and a markdown report.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from .._utils import atomic_write_bytes
from ..clustering import Clustering
from ..data import TensorSplits, load_dataset, make_mixture
from ..data.preprocess import Preprocessing
from ..eval import extract_features
from ..models import count_parameters
from ..moe.placement import by_scores
from ..sweep import inference_throughput
from .moce import MoCEObjective, build_moce, deploy, distinct_candidates, expert_choices, score_candidates
from .moce_demo import MoCEDemoConfig
from .moce_pipeline import (
    Stages,
    cluster_pool,
    continue_mae,
    finetune,
    finetune_warmup_epochs,
    grad_scores,
    pretrain_dense,
    progress_bar,
    task_augment,
    val_split,
)

__all__ = ["BUNDLE_FORMAT", "SELECT_METHODS", "pretrain_bundle", "load_bundle", "deploy_bundle", "read_task_images"]

BUNDLE_FORMAT = "visionmoe-moce-bundle/1"
SELECT_METHODS = ("cluster", "knn", "logme", "early-stop")


def _pool(c: MoCEDemoConfig, pool_root: str | Path | None) -> tuple[TensorSplits, dict]:
    """The pre-training pool: the bundled ``c.sources`` (``c.per_source`` images each), or every
    class folder under ``pool_root`` (labels ignored, at most ``c.per_source`` x the number of
    sources images, read with the bundle's preprocessing)."""
    if pool_root is None:
        mix = make_mixture([load_dataset(n) for n in c.sources], size=c.img_size, channels=1,
                           per_source=c.per_source, seed=0)
        pool = mix.as_splits("source")
        return pool, {"sources": list(mix.sources), "per_source": c.per_source, "images": len(pool.x_train)}
    x, _, _ = read_task_images("image_folder", {"root": str(pool_root)}, Preprocessing(size=c.img_size, channels=1),
                            limit=c.per_source * len(c.sources), seed=0, split="all")
    n_test = max(1, len(x) // 10)
    y = torch.zeros(len(x), dtype=torch.long)
    pool = TensorSplits(Path(pool_root).name, x[n_test:], y[n_test:], x[:n_test], y[:n_test], ["image"])
    return pool, {"folder": str(pool_root), "images": len(x)}


def pretrain_bundle(c: MoCEDemoConfig | None = None, *, out: str | Path = "runs/moce_bundle", seed: int = 0,
                    pool_root: str | Path | None = None, progress: bool = True) -> Path:
    """Pre-train MoCE once and write the bundle folder ``out`` (see the module docstring);
    returns its path. ``c``: the demo's settings (sizes, steps, clusters, experts, losses)."""
    c = c or MoCEDemoConfig()
    if c.threads:
        torch.set_num_threads(c.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pool, pool_info = _pool(c, pool_root)
    prep = Preprocessing(size=c.img_size, channels=1)
    t0 = time.perf_counter()
    with progress_bar(disable=not progress) as bar:
        stages = Stages(bar, c.mae_steps + c.extra_steps)
        enc, mae, curve = pretrain_dense(stages, c, seed, pool, out / "runs" / "mae", "MAE pre-training", bar.console)
        feats = extract_features(enc, pool.x_train)
        clustering, keys_tr, keys_te = cluster_pool(enc, feats, pool, c.num_clusters, c, seed)
        scores = grad_scores(enc, mae, pool, c)
        blocks = list(c.blocks) if c.blocks is not None else by_scores(scores, c.moe_blocks)
        moce = build_moce(enc, clustering, blocks=blocks, num_experts=c.num_experts, noise=0.01, seed=seed,
                          imbalance_weight=c.imbalance_weight, renormalize=c.renormalize)
        _, summary = continue_mae(stages, c, seed, mae, moce, pool.with_keys(keys_tr, keys_te), out / "runs" / "moce",
                               "MoCE", MoCEObjective, teacher=enc, distill_weight=c.distill_weight)
    from ..train import save_model

    save_model(out / "encoder.safetensors", enc, preprocessing=prep)
    save_model(out / "moce.safetensors", moce, preprocessing=prep)
    clustering.save(out / "clusters.safetensors")
    meta = {"format": BUNDLE_FORMAT, "seed": seed, "blocks": blocks, "grad_scores": scores,
            "num_experts": c.num_experts, "num_clusters": c.num_clusters, "preprocessing": prep.to_dict(),
            "pool": pool_info, "cluster_sizes": torch.bincount(keys_tr, minlength=c.num_clusters).tolist(),
            "mae_loss": curve, "moce_recon_loss": summary.get("test_recon_loss"),
            "expert_choices": {str(k): v for k, v in expert_choices(moce).items()},
            "seconds": time.perf_counter() - t0, "config": asdict(c)}
    atomic_write_bytes(out / "bundle.json", json.dumps(meta, indent=2).encode())
    return out


def load_bundle(path: str | Path) -> dict:
    """``{"path", "meta", "encoder", "moce", "clustering", "preprocessing"}`` of a bundle folder; a clear
    error names what is missing."""
    from ..train import load_trained_model

    path = Path(path)
    meta_file = path / "bundle.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a MoCE bundle (no bundle.json); write one with visionmoe moce pretrain")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{meta_file}: format {meta.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    for name in ("encoder.safetensors", "moce.safetensors", "clusters.safetensors"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"bundle {path} lacks {name}; re-run visionmoe moce pretrain")
    enc = load_trained_model(path / "encoder.safetensors")[0]
    moce = load_trained_model(path / "moce.safetensors")[0]
    return {"path": str(path), "meta": meta, "encoder": enc, "moce": moce,
            "clustering": Clustering.load(path / "clusters.safetensors"),
            "preprocessing": Preprocessing.from_dict(meta["preprocessing"])}


def read_task_images(name: str, args: dict, prep: Preprocessing, *, limit: int | None = 2000, seed: int = 0,
                     split: str = "train") -> tuple[Tensor, Tensor, list[str]]:
    """A task's images as tensors ``(N, C, H, W)`` prepared with ``prep``, their labels and the
    class names: a bundled data set by name, or a folder (``image_folder`` with ``root=``), at
    most ``limit`` images drawn at random (seeded) from the ``split`` (``train``, ``test`` or
    ``all``)."""
    data = load_dataset(name, **args)
    if isinstance(data, TensorSplits):
        parts = {"train": [(data.x_train, data.y_train)], "test": [(data.x_test, data.y_test)],
                 "all": [(data.x_train, data.y_train), (data.x_test, data.y_test)]}[split]
        x = torch.cat([prep(p[0]) for p in parts])
        y = torch.cat([p[1] for p in parts])
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:limit]
        return x[idx], y[idx], list(data.classes)
    items = {"train": data.train, "test": data.test, "all": data.train + data.test}[split]
    if not items:
        raise ValueError(f"{name} {args}: no images in its {split} split")
    idx = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:limit].tolist()
    x = torch.stack([prep.read(items[i][0]) for i in idx])
    y = torch.tensor([items[i][1] for i in idx], dtype=torch.long)
    return x, y, list(data.classes)


def deploy_bundle(bundle: str | Path | dict, x: Tensor, y: Tensor, *, out: str | Path, select: str = "cluster",
                  classes: list[str] | None = None, data: dict | None = None, probe_steps: int = 30, seed: int = 0,
                  progress: bool = True) -> dict:
    """Deploy the bundle for a task whose (prepared) training images are ``x`` with labels ``y``:
    pick the experts with ``select`` (:data:`SELECT_METHODS`), write ``out`` (the dense ViT
    checkpoint, e.g. ``dense.safetensors``), ``dense.train.yaml`` beside it (fine-tune it on
    ``data``, ``{"name": ..., "args": ...}``), and the report as JSON and markdown
    (``dense.json``, ``dense.md``); returns the
    report as a dict. ``bundle``: its folder, or what :func:`load_bundle` returned."""
    from ..train import save_model
    from ..train.persist import vit_model_config

    if select not in SELECT_METHODS:
        raise ValueError(f"--select must be one of {', '.join(SELECT_METHODS)}, got {select!r}")
    b = bundle if isinstance(bundle, dict) else load_bundle(bundle)
    enc, moce, clustering, prep, meta = b["encoder"], b["moce"], b["clustering"], b["preprocessing"], b["meta"]
    if tuple(x.shape[1:]) != (prep.channels, prep.size, prep.size):
        raise ValueError(f"images of shape {tuple(x.shape[1:])}, the bundle expects "
                         f"{(prep.channels, prep.size, prep.size)}; read them with the bundle's preprocessing")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ids = clustering.assign(extract_features(enc, x))
    hist = torch.bincount(ids, minlength=clustering.num_clusters)
    largest = int(hist.argmax())
    cands = distinct_candidates(moce, hist)
    scores: dict[int, float] = {}
    if select in ("knn", "logme"):
        scores = score_candidates(moce, cands, x, y, method=select, seed=seed)
    c = MoCEDemoConfig(**{k: v for k, v in meta["config"].items() if k in MoCEDemoConfig.__dataclass_fields__})
    if select == "early-stop":
        n_classes = int(y.max()) + 1
        task = val_split(TensorSplits("task", x, y, x[:1], y[:1], [str(i) for i in range(n_classes)]), seed)
        with progress_bar(disable=not progress) as bar:
            stages = Stages(bar, len(cands) * probe_steps)
            run_dir = out.parent / f"{out.stem}_search"
            scores = {cl: finetune(stages, deploy(moce, cl), task, c, seed, run_dir / f"cluster{cl}",
                                    c.finetune_lrs[0], steps=probe_steps) for cl in cands}
    cluster = max(scores, key=scores.get) if scores else largest
    dense = deploy(moce, cluster)
    # checks: the dense model is the MoCE model for this cluster's images; its size and speed are the encoder's
    probe_x = x[:64]
    with torch.inference_mode():
        moe_tokens = moce.eval().forward_features(probe_x, routing_key=torch.full((len(probe_x),), cluster))
        max_diff = float((dense.eval().forward_features(probe_x) - moe_tokens).abs().max())
    timing_x = x[:256]
    with torch.inference_mode():  # the demo's throughput measure (sweep.inference_throughput), as ms per image
        t_dense, t_enc = (1 / inference_throughput(m, timing_x) for m in (dense, enc))
    save_model(out, dense, preprocessing=prep, classes=classes)
    train_yaml = out.with_name(out.stem + ".train.yaml")
    run_root = str(out.parent if ".." not in out.parent.parts else out.parent.resolve())  # run.out_dir refuses ".."
    # the demo's fine-tuning protocol (the bundle's config); with finetune_augment: auto, shifts and
    # small rotations, which keep the labels of most sets (data.augment=flip|basic where a mirror does too)
    warmup = finetune_warmup_epochs(c, c.finetune_steps, len(x))
    train_cfg = {
        "description": f"fine-tune the dense ViT deployed from {b['path']} (cluster {cluster})",
        # the ViT's shape (same keys as the checkpoint: token pooling); classes and channels from the data
        "model": {**vit_model_config(dense), "init": str(out)},
        "data": {**(data or {"name": "image_folder", "args": {"root": "DIR"}}), "img_size": prep.size,
                 "channels": prep.channels, "augment": task_augment(c.finetune_augment, "your folder"),
                 "batch_size": c.finetune_batch_size},
        "optim": {"name": c.finetune_optim, "lr": c.finetune_lrs[0], "weight_decay": c.finetune_weight_decay,
                  "layer_decay": c.finetune_layer_decay},
        "schedule": {"max_steps": c.finetune_steps, "warmup_epochs": round(warmup, 3), "min_lr": 0.0},
        "run": {"label_smoothing": c.label_smoothing, "seed": seed, "out_dir": run_root,
                "name": f"{out.stem}_finetune"},
    }
    import yaml

    atomic_write_bytes(train_yaml, yaml.safe_dump(train_cfg, sort_keys=False).encode())
    report = {"bundle": b["path"], "select": select, "cluster": cluster, "largest_cluster": largest,
              "share": float(hist[cluster]) / max(1, len(ids)), "histogram": hist.tolist(), "candidates": cands,
              "scores": {str(k): v for k, v in scores.items()},
              "experts": list(expert_choices(moce)[cluster]), "images": len(x),
              "max_abs_diff_vs_moce": max_diff,
              "params": {"dense": count_parameters(dense)["total"], "encoder": count_parameters(enc)["total"],
                         "moce": count_parameters(moce)["total"]},
              "ms_per_image": {"dense": 1e3 * t_dense, "encoder": 1e3 * t_enc},
              "checkpoint": str(out), "train_config": str(train_yaml)}
    atomic_write_bytes(out.with_suffix(".json"), json.dumps(report, indent=2).encode())
    atomic_write_bytes(out.with_suffix(".md"), _deploy_markdown(report).encode())
    return report


def _deploy_markdown(r: dict) -> str:
    hist = ", ".join(f"{i}: {n}" for i, n in enumerate(r["histogram"]) if n)
    lines = [f"# MoCE deployment of {r['bundle']}", "",
             f"- {r['images']} training images of the task; cluster shares (cluster: images): {hist}",
             f"- selection `{r['select']}`: cluster **{r['cluster']}** ({r['share']:.1%} of the images; the largest "
             f"is {r['largest_cluster']}), experts {r['experts']} (one per MoE block)"]
    if r["scores"]:
        lines.append("- scores of the distinct expert choices: "
                     + ", ".join(f"cluster {k}: {v:.4f}" for k, v in r["scores"].items()))
    p, t = r["params"], r["ms_per_image"]
    lines += [f"- the dense model equals the MoCE model on this cluster's routing: max |difference| of the features "
              f"{r['max_abs_diff_vs_moce']:.2e}",
              f"- parameters: dense {p['dense']:,} = encoder {p['encoder']:,} (MoCE {p['moce']:,}); "
              f"time per image: dense {t['dense']:.3f} ms, encoder {t['encoder']:.3f} ms",
              f"- checkpoint `{r['checkpoint']}`; fine-tune it: `visionmoe train {r['train_config']}`", ""]
    return "\n".join(lines)
