"""The ``visionmoe`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main", "console_main"]


def _config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """``CONFIG key=value ...`` where CONFIG is optional: a first word with ``=`` that is not a
    file is an override."""
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        config, overrides = None, [config, *overrides]
    return config, overrides


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.vmoe:
        from ..recipes.demo import run_demo

        if any(_config_and_overrides(args)):
            raise ValueError("--vmoe takes no config or overrides (only --quick, --seed, --out)")
        res = run_demo(quick=args.quick, seed=args.seed or 0, out=args.out or "runs/demo",
                       progress=not args.no_progress)
        return 0 if res["test_accuracy"] > 0.1 else 1
    from ..recipes.moce_demo import MoCEDemoConfig, run_moce_demo

    cfg = MoCEDemoConfig.from_yaml(*_config_and_overrides(args), quick=args.quick)
    if args.seeds:
        cfg.seeds = list(range(args.seeds))
    if args.seed is not None:
        cfg.seeds = [args.seed]
    res = run_moce_demo(cfg, out=args.out or "runs/moce_demo", progress=not args.no_progress)
    return 0 if res["tasks"] else 1


def _cmd_moce_study(args: argparse.Namespace) -> int:
    from ..recipes.moce_demo import MoCEDemoConfig
    from ..recipes.moce_studies import STUDIES

    cfg = MoCEDemoConfig.from_yaml(*_config_and_overrides(args), quick=args.quick)
    if args.seeds:
        cfg.seeds = list(range(args.seeds))
    out = args.out or f"runs/moce_{args.study.replace('-', '_')}"
    res = STUDIES[args.study](cfg, out=out, progress=not args.no_progress)
    return 0 if res["runs"] else 1


def _cmd_moce_pretrain(args: argparse.Namespace) -> int:
    from ..recipes.moce_bundle import pretrain_bundle
    from ..recipes.moce_demo import MoCEDemoConfig

    cfg = MoCEDemoConfig.from_yaml(*_config_and_overrides(args), quick=args.quick)
    out = pretrain_bundle(cfg, out=args.out, seed=args.seed, pool_root=args.pool_root, progress=not args.no_progress)
    meta = json.loads((out / "bundle.json").read_text())
    print(f"MoCE bundle {out}: {meta['pool']['images']} pool images, {meta['num_clusters']} clusters, "
          f"{meta['num_experts']} experts in blocks {meta['blocks']}; MAE loss {meta['mae_loss']['first']:.3f} -> "
          f"{meta['mae_loss']['last']:.3f} ({meta['seconds']:.0f} s)")
    print(f"deploy it for a task: visionmoe moce deploy {out} --data image_folder root=DIR -o dense.safetensors")
    return 0


def _cmd_moce_deploy(args: argparse.Namespace) -> int:
    from ..recipes.moce_bundle import deploy_bundle, load_bundle, read_task_images
    from ..train.config import apply_overrides

    name, *kv = args.data
    bad = [item for item in kv if "=" not in item]
    if bad:
        raise ValueError(f"--data {name} takes key=value arguments, got {bad[0]!r} (e.g. root=DIR)")
    data_args = apply_overrides({}, kv)
    bundle = load_bundle(args.bundle)
    x, y, classes = read_task_images(name, data_args, bundle["preprocessing"], limit=args.max_images, seed=args.seed)
    rep = deploy_bundle(bundle, x, y, out=args.output, select=args.select, classes=classes,
                        data={"name": name, "args": data_args}, probe_steps=args.probe_steps, seed=args.seed,
                        progress=not args.no_progress)
    shares = ", ".join(f"{i}: {n}" for i, n in enumerate(rep["histogram"]) if n)
    print(f"{rep['images']} images of {name} -> clusters {{{shares}}}")
    if rep["scores"]:
        print(f"{args.select} scores: " + ", ".join(f"cluster {k} {v:.4f}" for k, v in rep["scores"].items()))
    print(f"deployed cluster {rep['cluster']} (experts {rep['experts']}): {rep['checkpoint']} "
          f"({rep['params']['dense']:,} parameters = the dense encoder's; |dense - MoCE| <= "
          f"{rep['max_abs_diff_vs_moce']:.1e})")
    print(f"fine-tune it: visionmoe train {rep['train_config']}")
    return 0


def _cmd_crmoe(args: argparse.Namespace) -> int:
    from ..recipes.crmoe import CRMoEStudyConfig, run_crmoe_study

    cfg = CRMoEStudyConfig.from_overrides(args.overrides, quick=args.quick)
    res = run_crmoe_study(cfg, out=args.out, progress=not args.no_progress, resume=args.resume)
    return 0 if res["runs"] else 1


def _cmd_vimoe(args: argparse.Namespace) -> int:
    from ..recipes.vimoe import ViMoEStudyConfig, run_vimoe_study

    cfg = ViMoEStudyConfig.from_overrides(args.overrides, quick=args.quick)
    res = run_vimoe_study(cfg, out=args.out, progress=not args.no_progress)
    return 0 if res["stability"] or res["segmentation"] else 1


def _prepared_tasks(names: list[str], prep, n_train: int | None, n_test: int | None) -> dict:
    """Bundled data sets as in-memory splits prepared exactly as a checkpoint's inputs
    (``prep``: its stored preprocessing)."""
    import torch

    from ..data import TensorSplits, load_dataset
    from ..data.streaming import ensure_tensor_splits

    out = {}
    for name in names:
        s = ensure_tensor_splits(load_dataset(name), f"data set {name!r}")
        g = torch.Generator().manual_seed(0)
        tr = torch.randperm(len(s.x_train), generator=g)[:n_train] if n_train else torch.arange(len(s.x_train))
        te = torch.randperm(len(s.x_test), generator=g)[:n_test] if n_test else torch.arange(len(s.x_test))
        out[name] = TensorSplits(s.name, prep(s.x_train[tr]), s.y_train[tr], prep(s.x_test[te]), s.y_test[te],
                                 s.classes)
    return out


def _cmd_probe(args: argparse.Namespace) -> int:
    from ..eval import evaluate_backbone, head_first_layer
    from ..train.checkpoint import load_checkpoint
    from ..train.persist import rebuild_model

    ck = load_checkpoint(args.checkpoint)
    model, cfg, st = rebuild_model(ck, args.checkpoint)
    prep = st.preprocess
    print(f"{args.checkpoint}: {prep.describe()}", file=sys.stderr)
    head = head_first_layer(ck.get("objective"), getattr(model, "embed_dim", -1))
    if args.semi_finetune:
        print("semi-supervised fine-tuning from " + ("the first layer of the checkpoint's MoCo projector" if head
                                                     is not None else "a new linear head (no MoCo projector in "
                                                     "the checkpoint)"), file=sys.stderr)
    tasks = _prepared_tasks(args.data, prep, args.train_limit, args.test_limit)
    first = next(iter(tasks.values()))
    res = evaluate_backbone(model, tasks, shots=args.shots, episodes=args.episodes, semi=first,
                            semi_linear_fractions=args.semi_linear, semi_finetune_fractions=args.semi_finetune,
                            semi_steps=args.semi_steps, semi_lrs=args.semi_lrs, head=head,
                            consistency_x=first.x_test[:512], run_dir=Path(args.out))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    from .._utils import atomic_write_bytes

    atomic_write_bytes(Path(args.out) / "probe.json", json.dumps(res, indent=2).encode())
    print(json.dumps(res, indent=2))
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from ..analysis.report import analyze_routing
    from ..data import load_dataset
    from ..data.streaming import collate, eval_set

    model, cfg, st = _model_from_checkpoint(args.checkpoint)
    d = load_dataset(args.data or cfg.data.name, **(cfg.data.args if not args.data else {}))
    ds = eval_set(d, st.preprocess)
    n = min(args.limit, len(ds))
    x, y = collate(ds.__getitems__(list(range(n))))[:2]  # the first n test images, prepared as in training
    res = analyze_routing(model, x, y, d.classes, args.out)
    print(f"routing degree {res['routing_degree']:,}; report: {Path(args.out) / 'report.md'}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from ..sweep import load_variants, parse_grid, run_sweep
    from ..train.config import apply_overrides, load_yaml_dict

    config, overrides = _config_and_overrides(args)
    base = apply_overrides(load_yaml_dict(config), overrides)
    variants = load_variants(args.variants) if args.variants else None
    rows = run_sweep(base, parse_grid(args.grid), variants=variants, out=args.out, progress=not args.no_progress,
                     resume=args.resume)
    print((Path(args.out) / "sweep.md").read_text())
    return 0 if rows else 1


def _cmd_layer_scan(args: argparse.Namespace) -> int:
    from ..sweep import run_layer_scan
    from ..train import config_from_dict
    from ..train.config import apply_overrides, load_yaml_dict

    config, overrides = _config_and_overrides(args)
    base = apply_overrides(load_yaml_dict(config), overrides)
    depth = args.depth
    if depth is None:
        from ..train import build_model

        depth = len(build_model(config_from_dict(base), num_classes=2, in_chans=1).blocks)
    shared = {"both": (False, True), "yes": (True,), "no": (False,)}[args.shared]
    run_layer_scan(base, depth, shared=shared, seeds=args.seeds, out=args.out, progress=not args.no_progress,
                   resume=args.resume)
    print((Path(args.out) / "sweep.md").read_text())
    return 0


def _cmd_list_models(args: argparse.Namespace) -> int:
    from ..models import list_models, model_description

    for name in list_models(args.pattern):
        print(f"{name:32s} {model_description(name)}")
    return 0


def _model_from_checkpoint(path: str):
    from ..train import load_trained_model

    return load_trained_model(path)


def _cmd_info(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ..models import count_parameters, create_model

    if Path(args.model).is_file():
        model, cfg, st = _model_from_checkpoint(args.model)
        name = cfg.model.name
        if st.model_spec:  # a model built by hand: its own shape, not the config's variant name
            kw = st.model_spec["kwargs"]
            name = "VisionTransformer(" + ", ".join(f"{k}={kw[k]}" for k in (
                "img_size", "patch_size", "embed_dim", "depth", "num_heads", "in_chans") if k in kw) + ")"
        print(f"checkpoint {args.model}: model {name}, step {st.step}, data {cfg.data.name} "
              f"({st.num_classes} classes); input: {st.preprocess.describe()}")
    elif Path(args.model).suffix in (".safetensors", ".pt", ".pth", ".bin") or Path(args.model).is_dir():
        what = "is a directory, not a checkpoint file" if Path(args.model).is_dir() else "does not exist"
        raise FileNotFoundError(f"{args.model} {what}; give a checkpoint file or a model name (visionmoe "
                                "list-models)")
    else:
        with torch.device("meta"):
            model = create_model(args.model)
        name = args.model
    c = count_parameters(model)
    print(f"{name}: {c['total'] / 1e6:.2f}M parameters, {c['active'] / 1e6:.2f}M active per token")
    if getattr(model, "is_moe", False):
        cfg = model.moe_config
        print(f"MoE blocks {model.moe_blocks}: {cfg.num_experts} experts, top-{cfg.top_k}, router {cfg.router}, "
              f"routing {cfg.routing}, capacity factor {cfg.capacity_factor} (eval {cfg.eval_capacity_factor})")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from ..train import Trainer, load_config

    cfg = load_config(*_config_and_overrides(args))
    trainer = Trainer(cfg, run_dir=args.run_dir)
    if args.allow_change and not args.resume:
        raise ValueError("--allow-change applies to --resume only")
    summary = trainer.fit(resume=args.resume, overwrite=args.overwrite, allow_changes=args.allow_change)
    if trainer.dist.is_main:
        print(json.dumps({k: v for k, v in summary.items() if k != "routing"}, indent=2))
    return 0


def _eval_data(cfg, st, args):
    """The data set ``eval`` scores on: the checkpoint's own, or ``--data`` / ``--data-arg``."""
    from ..data import load_dataset
    from ..train.config import parse_yaml_value

    if args.data:
        cfg.data.name = args.data
        cfg.data.args = {}
    for item in args.data_arg:
        if "=" not in item:
            raise ValueError(f"--data-arg {item!r} must look like key=value")
        k, v = item.split("=", 1)
        cfg.data.args[k] = parse_yaml_value(v, f"--data-arg {k}")
    data = load_dataset(cfg.data.name, **cfg.data.args)
    if data.num_classes != st.num_classes:
        raise ValueError(f"the checkpoint predicts {st.num_classes} classes but {data.name!r} has "
                         f"{data.num_classes}; evaluate on a data set with the same classes")
    return data


def _cmd_eval(args: argparse.Namespace) -> int:
    from ..data.streaming import default_workers, eval_set
    from ..objectives import create_objective
    from ..train import RunContext, evaluate_objective
    from ..train.checkpoint import load_checkpoint
    from ..train.persist import rebuild_model

    ck = load_checkpoint(args.checkpoint)  # read and verified once: the model and the objective's weights
    model, cfg, st = rebuild_model(ck, args.checkpoint)
    data = _eval_data(cfg, st, args)
    ctx = RunContext.create(device=args.device, amp="none")
    prep = st.preprocess
    objective = create_objective(cfg.objective, model, num_classes=st.num_classes, total_steps=1, run=cfg.run,
                                 args=cfg.objective_args)
    saved = ck["objective"]
    if saved:  # the objective's own weights (MAE decoder, segmentation head) as trained
        objective.load_state_dict(saved)
    ds = eval_set(data, prep)
    print(f"evaluating {args.checkpoint} on {data.name!r} ({len(ds):,} test images): {prep.describe()}; "
          f"{ctx.describe()}", file=sys.stderr)
    res = evaluate_objective(model.to(ctx.device), objective.to(ctx.device), ds, ctx,
                             batch_size=cfg.data.eval_batch_size, workers=default_workers(data))
    print(json.dumps(res, indent=2))
    return 0


def _onnx_metadata(st) -> dict[str, str]:
    return {"visionmoe.preprocessing": json.dumps(st.preprocess.to_dict()),
            "visionmoe.classes": json.dumps(list(st.classes))}


def _cmd_export(args: argparse.Namespace) -> int:
    from ..export import export_onnx

    model, cfg, st = _model_from_checkpoint(args.checkpoint)
    prep = st.preprocess
    out = args.out or str(Path(args.checkpoint).with_suffix(".onnx"))
    res = export_onnx(model, out, input_shape=(prep.channels, prep.size, prep.size), key=args.key,
                      check=not args.no_check, dynamo=not args.legacy, metadata=_onnx_metadata(st),
                      experts="dense" if args.dense_experts else "sparse")
    diff = "" if res["max_abs_diff"] is None else f"; onnxruntime matches PyTorch within {res['max_abs_diff']:.2g}"
    kind = res["kind"] + (f", {res['experts']} experts" if res.get("experts") else "")
    print(f"wrote {res['path']} ({kind}, input {res['input_shape']}: {prep.describe()}){diff}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    import torch

    from ..export import predict_images

    model, cfg, st = _model_from_checkpoint(args.checkpoint)
    if args.key is not None:
        model = model.extract_dense(key=args.key).eval()
    prep = st.preprocess
    print(f"{args.checkpoint}: {prep.describe()}", file=sys.stderr)
    xs, names = [], []
    for p in args.images:
        try:
            xs.append(prep.read(p))
            names.append(p)
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported and skipped
            print(f"skipping {p}: not a readable image ({type(e).__name__}: {e})", file=sys.stderr)
    if not xs:
        raise ValueError("none of the given files is a readable image")
    x = torch.stack(xs)
    preds = []
    for i in range(0, len(x), 256):
        preds += predict_images(model, x[i : i + 256], st.classes or None, top=args.top, routing=args.routing)
    if args.json:
        print(json.dumps([{"image": n, **p} for n, p in zip(names, preds)], indent=2))
        return 0
    for name, p in zip(names, preds):
        print(f"{name}: " + ", ".join(f"{c} {v:.1%}" for c, v in p["top"]))
        for layer, experts in p.get("experts", {}).items():
            print(f"    {layer}: " + ", ".join(f"expert {e} ({s:.0%})" for e, s in experts))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.data_parallel:
        from ..bench.data_parallel import benchmark_data_parallel

        benchmark_data_parallel(args.data_parallel, nprocs=tuple(args.procs), steps=args.steps, threads=args.threads,
                                out=args.out, expert_parallel=args.expert_parallel)
        print((Path(args.out) / "bench_dp.md").read_text())
        return 0
    from ..bench import run_from_args

    run_from_args(args)
    return 0


def _cmd_bench_data(args: argparse.Namespace) -> int:
    from ..bench.data import run_data_bench

    root = args.root
    if root is None:
        from ..data import make_photo_folder

        root = make_photo_folder(Path(args.out) / "photos", per_class=40, val_per_class=0) / "train"
        print(f"no folder given: generated {root} (400 JPEGs of 256-500 px from the bundled photos)", file=sys.stderr)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    res = run_data_bench(root, size=args.size, workers=args.workers, batch_size=args.batch_size,
                         batches=args.batches, model=None if args.model == "none" else args.model,
                         model_batch=args.model_batch, model_steps=args.model_steps, threads=args.threads,
                         device=args.device, amp=args.amp, out=args.out)
    ld = res["loader"]
    print(f"loader: {ld['images_per_s']:.1f} images/s ({ld['size']} px RandomResizedCrop + flip from JPEG, "
          f"{ld['workers']} workers, batch {ld['batch_size']}, {ld['images']} images)")
    if "model" in res:
        m = res["model"]
        print(f"training step: {m['images_per_s']:.1f} images/s ({m['model']}, batch {m['batch_size']}, "
              f"{m['device']}, amp {m['amp']}, {m['threads']} threads, loader included)")
    return 0


def _cmd_list_data(args: argparse.Namespace) -> int:
    from ..data import list_datasets

    for name, info in list_datasets().items():
        print(f"{name:14s} {info.description}  [licence: {info.licence}]")
    return 0


def _cmd_build_native(args: argparse.Namespace) -> int:
    from ..moe import native

    if args.status:
        print(native.status())
        return 0
    if not native.built():
        print(f"[native] compiling the CPU expert loop ({native.SOURCE.name}, about 35 s) ...", file=sys.stderr)
    try:
        native.build(verbose=args.verbose)
    except (RuntimeError, OSError) as e:
        print(f"visionmoe: error: the compiled expert loop was not built: {e}", file=sys.stderr)
        return 1
    print(native.status())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="visionmoe", description="Vision Mixture-of-Experts: train, analyse, deploy.")
    p.add_argument("--allow-unverified", action="store_true",
                   help="load checkpoints that have no checksum (saved before checksums); only for files you trust")
    sub = p.add_subparsers(dest="command", required=True)

    _add_study_commands(sub)
    _add_analysis_commands(sub)
    _add_model_commands(sub)
    _add_tool_commands(sub)
    return p


def _add_study_commands(sub) -> None:
    """The subcommands of the studies: demo, moce-study, moce (:func:`_add_moce_commands`), crmoe, vimoe."""
    _add_moce_commands(sub)
    cr = sub.add_parser("crmoe", help="CR-MoE study: MoCo v3 dense / V-MoE / V-MoE+OGAR, evaluation protocols",
                        description="MoCo v3 pre-training of a dense ViT, a V-MoE and a V-MoE with OGAR at equal "
                                    "steps, 3 seeds, then linear probe, k-NN, few-shot, semi-supervised and routing "
                                    "consistency; writes report.md (about 45-60 minutes on 2 idle CPU cores; "
                                    "--quick about 1).")
    cr.add_argument("overrides", nargs="*", help="settings as key=value, e.g. ogar_weight=0.01 steps=300")
    cr.add_argument("--quick", action="store_true")
    cr.add_argument("--out", default="runs/crmoe")
    cr.add_argument("--resume", action="store_true",
                    help="keep the runs an earlier call finished in --out (same settings; more seeds allowed)")
    cr.add_argument("--no-progress", action="store_true")
    cr.set_defaults(fn=_cmd_crmoe)

    vm = sub.add_parser("vimoe", help="ViMoE study: upcycle a pre-trained dense ViT; stability with/without the "
                                      "shared expert, token-routed segmentation vs dense (mIoU)",
                        description="Pre-trains a dense ViT, upcycles it into MoEs and runs (1) MoE in every block "
                                    "with CLS routing with and without the shared expert vs dense fine-tuning, (2) "
                                    "token-routed MoE vs dense segmentation on fashion_scenes, each beside the "
                                    "same fine-tune from random init; 5 seeds; writes report.md (about 20 "
                                    "minutes on 2 CPU cores; --quick about half a minute).")
    vm.add_argument("overrides", nargs="*", help="settings as key=value, e.g. parts=[segmentation] seg_epochs=20")
    vm.add_argument("--quick", action="store_true")
    vm.add_argument("--out", default="runs/vimoe")
    vm.add_argument("--no-progress", action="store_true")
    vm.set_defaults(fn=_cmd_vimoe)


def _add_moce_commands(sub) -> None:
    """demo, moce-study and moce pretrain / deploy."""
    d = sub.add_parser(
        "demo", help="MoCE end to end on bundled real images: MAE, clustering, MoCE vs MAE* vs TokenMoE, transfer",
        description="MAE pre-training, balanced clustering, MoCE / MAE* / TokenMoE with equal extra compute, "
                    "deployment and fine-tuning on several real tasks, 3 seeds; writes report.md with plots "
                    "(about 45 minutes on 2 CPU cores; --quick about 3). --vmoe runs the one-minute V-MoE "
                    "digits demo instead.")
    d.add_argument("config", nargs="?", default=None,
                   help="optional YAML file of demo settings (configs/moce/*.yaml), e.g. an ablation")
    d.add_argument("overrides", nargs="*", help="settings as key=value, e.g. num_experts=8 distill_weight=0")
    d.add_argument("--quick", action="store_true",
                   help="1,500 MAE steps, MNIST and digits, one seed (about three minutes)")
    d.add_argument("--seeds", type=int, default=None, help="run seeds 0..N-1 (default 3; quick 1)")
    d.add_argument("--seed", type=int, default=None, help="run this one seed")
    d.add_argument("--out", default=None, help="output folder (default runs/moce_demo, or runs/demo with --vmoe)")
    d.add_argument("--vmoe", action="store_true", help="the V-MoE digits demo (about a minute) instead")

    ms = sub.add_parser(
        "moce-study", help="MoCE analyses: negative transfer (Fig. 1a), MoCE from scratch (Table 11), ablations "
                           "(Tables 6-9)",
        description="negative-transfer: MAE pre-trained on two disjoint halves of the pool and on the whole, "
                    "transferred to every task; from-scratch: MoCE from random init on the clusters of a short "
                    "MAE run vs MAE from scratch, equal steps; ablations: MoCE with one setting changed at a time "
                    "(experts 1/2/4/8, first/last two blocks, 4/16/32 clusters, no imbalance / distillation loss) "
                    "from one MAE per seed. Takes the demo's settings; writes report.md, results.json and bar "
                    "charts (negative-transfer and from-scratch about 30 minutes for 3 seeds on 2 CPU cores, "
                    "ablations about 50).")
    ms.add_argument("study", choices=["negative-transfer", "from-scratch", "ablations"])
    ms.add_argument("config", nargs="?", default=None, help="optional YAML file of demo settings")
    ms.add_argument("overrides", nargs="*", help="demo settings as key=value, e.g. mae_steps=200")
    ms.add_argument("--quick", action="store_true", help="the demo's quick sizes, one seed")
    ms.add_argument("--seeds", type=int, default=None, help="run seeds 0..N-1 (default 3; quick 1)")
    ms.add_argument("--out", default=None, help="output folder (default runs/moce_<study>)")
    ms.add_argument("--no-progress", action="store_true", help="no progress bar")
    ms.set_defaults(fn=_cmd_moce_study)
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    d.set_defaults(fn=_cmd_demo)

    mo = sub.add_parser("moce", help="MoCE as a product: pre-train a bundle once, deploy a dense ViT for a task")
    mo_sub = mo.add_subparsers(dest="moce_command", required=True)
    mp = mo_sub.add_parser("pretrain", help="dense MAE, clustering, MoCE experts: write a MoCE bundle folder",
                           description="Runs the demo's pre-training stages (settings as in visionmoe demo: YAML "
                                       "file and/or key=value) on the bundled pool or --pool-root, and writes "
                                       "bundle.json, encoder/moce/clusters.safetensors to -o.")
    mp.add_argument("config", nargs="?", default=None, help="optional YAML file of demo settings")
    mp.add_argument("overrides", nargs="*", help="settings as key=value, e.g. mae_steps=2000 num_experts=8")
    mp.add_argument("--quick", action="store_true", help="the demo's quick sizes (about a minute)")
    mp.add_argument("--pool-root", default=None, help="pre-train on the images of this folder (class sub-folders, "
                                                      "labels ignored) instead of the bundled pool")
    mp.add_argument("--seed", type=int, default=0)
    mp.add_argument("-o", "--out", default="runs/moce_bundle", help="bundle folder (default runs/moce_bundle)")
    mp.add_argument("--no-progress", action="store_true", help="no progress bar")
    mp.set_defaults(fn=_cmd_moce_pretrain)
    md = mo_sub.add_parser("deploy", help="pick a task's experts and write its dense ViT (+ train.yaml, report)",
                           description="Assigns the task's training images to the bundle's clusters, picks the "
                                       "experts, extracts the plain dense ViT (timm keys) and writes it with a "
                                       "fine-tuning config and a report.")
    md.add_argument("bundle", help="a folder written by visionmoe moce pretrain")
    md.add_argument("--data", nargs="+", required=True, metavar="NAME [key=value]",
                    help="the task: image_folder root=DIR, or a bundled set (visionmoe list-data)")
    md.add_argument("--select", default="cluster", choices=["cluster", "knn", "logme", "early-stop"],
                    help="cluster: the largest cluster (MoCE); knn / logme: frozen-feature scores; early-stop: "
                         "short fine-tunes on a validation split")
    md.add_argument("--max-images", type=int, default=2000, help="training images read for the selection")
    md.add_argument("--probe-steps", type=int, default=30, help="fine-tuning steps per candidate for early-stop")
    md.add_argument("--seed", type=int, default=0)
    md.add_argument("-o", "--output", default="dense.safetensors", help="the dense checkpoint to write")
    md.add_argument("--no-progress", action="store_true", help="no progress bar")
    md.set_defaults(fn=_cmd_moce_deploy)


def _add_analysis_commands(sub) -> None:
    """The subcommands of evaluation and design-space tools: probe, analyze, sweep, layer-scan."""
    pr = sub.add_parser("probe", help="evaluation protocols on a checkpoint: linear probe, k-NN, few-shot, "
                                      "semi-supervised, routing consistency")
    pr.add_argument("checkpoint")
    pr.add_argument("--data", nargs="+", default=["fashion_mnist"], help="labelled data sets to evaluate on")
    pr.add_argument("--shots", type=int, nargs="*", default=[4, 10])
    pr.add_argument("--episodes", type=int, default=5, help="sampled few-shot splits")
    pr.add_argument("--semi-linear", type=float, nargs="*", default=[], metavar="F",
                    help="label fractions for a linear classifier on frozen features (CR-MoE's 1%%: 0.01)")
    pr.add_argument("--semi-finetune", type=float, nargs="*", default=[], metavar="F",
                    help="label fractions to fine-tune on from the first MLP-head layer (CR-MoE's 10%%: 0.1)")
    pr.add_argument("--semi-steps", type=int, default=200, help="fine-tuning steps (default 200)")
    pr.add_argument("--semi-lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3], metavar="LR",
                    help="learning rates tried on a validation split (default 1e-4 3e-4 1e-3 3e-3)")
    pr.add_argument("--train-limit", type=int, default=5000)
    pr.add_argument("--test-limit", type=int, default=2000)
    pr.add_argument("--out", default="runs/probe")
    pr.set_defaults(fn=_cmd_probe)

    an = sub.add_parser("analyze", help="routing analysis of a MoE checkpoint: load, distinct experts, class "
                                        "occurrence, expert similarity, token maps, routing degree")
    an.add_argument("checkpoint")
    an.add_argument("--data", default=None, help="labelled data set (default: the one it was trained on)")
    an.add_argument("--limit", type=int, default=2000, help="test images to analyse")
    an.add_argument("--out", default="runs/analysis")
    an.set_defaults(fn=_cmd_analyze)

    sw = sub.add_parser("sweep", help="train a grid of configs and tabulate accuracy, params, FLOPs, throughput")
    sw.add_argument("config", nargs="?", default=None, help="base YAML experiment file")
    sw.add_argument("overrides", nargs="*", help="overrides of the base, key=value")
    sw.add_argument("--grid", action="append", default=[], help="key=[v1, v2] (repeatable; the product is trained)")
    sw.add_argument("--variants", default=None, metavar="YAML",
                    help="named variants, each a mapping of dotted overrides (e.g. "
                         "configs/sweetspot/routing_methods.yaml); every variant is trained at every grid point")
    sw.add_argument("--out", default="runs/sweep")
    sw.add_argument("--resume", action="store_true", help="keep the points an earlier call finished in --out")
    sw.add_argument("--no-progress", action="store_true")
    sw.set_defaults(fn=_cmd_sweep)

    ls_ = sub.add_parser("layer-scan", help="ViMoE layer scan: MoE in the last L blocks, L = 0..depth, "
                                            "with/without shared expert; accuracy and routing degree vs L")
    ls_.add_argument("config", nargs="?", default=None)
    ls_.add_argument("overrides", nargs="*")
    ls_.add_argument("--depth", type=int, default=None, help="largest L (default: the model's depth)")
    ls_.add_argument("--shared", choices=["both", "yes", "no"], default="both")
    ls_.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                     help="train every point once per seed (run.seed); the report gets mean ± std and seed-paired "
                          "differences with 95%% intervals")
    ls_.add_argument("--out", default="runs/layer_scan")
    ls_.add_argument("--resume", action="store_true", help="keep the points an earlier call finished in --out")
    ls_.add_argument("--no-progress", action="store_true")
    ls_.set_defaults(fn=_cmd_layer_scan)


def _add_model_commands(sub) -> None:
    """The subcommands of models and checkpoints: list-models, train, eval, export, predict."""
    lm = sub.add_parser("list-models", help="list registered model variants")
    lm.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'vmoe*'")
    lm.set_defaults(fn=_cmd_list_models)

    t = sub.add_parser("train", help="train from a YAML config with key=value overrides")
    t.add_argument("config", nargs="?", default=None, help="YAML experiment file (configs/...)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. moe.num_experts=16 optim.lr=5e-4")
    t.add_argument("--run-dir", default=None, help="run folder (default run.out_dir/run.name)")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    t.add_argument("--overwrite", action="store_true", help="start over in a run folder that holds another run "
                                                            "(its checkpoints are deleted)")
    t.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                   help="with --resume: a config key (or section) that may differ from the checkpoint's, e.g. "
                        "schedule.max_steps (repeatable)")
    t.set_defaults(fn=_cmd_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint on its data set or another one")
    ev.add_argument("checkpoint")
    ev.add_argument("--data", default=None, help="data set name (default: the one it was trained on)")
    ev.add_argument("--data-arg", action="append", default=[], help="loader argument key=value, repeatable")
    ev.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N, mps")
    ev.set_defaults(fn=_cmd_eval)

    ex = sub.add_parser("export", help="write a checkpoint as ONNX (dense, MoE with routing, or the dense model of "
                                       "one cluster/task's experts) and check it in onnxruntime")
    ex.add_argument("checkpoint")
    ex.add_argument("-o", "--out", default=None, help="ONNX file (default: the checkpoint's name with .onnx)")
    ex.add_argument("--key", type=int, default=None,
                    help="MoCE / task-routed models: export the dense ViT of this cluster or task id's experts")
    ex.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    ex.add_argument("--legacy", action="store_true", help="use the TorchScript-based exporter (faster, deprecated)")
    ex.add_argument("--dense-experts", action="store_true",
                    help="MoE: every expert on every token (static shapes, dropless, E/K times the expert FLOPs) "
                         "instead of the routed computation with the eval capacity")
    ex.set_defaults(fn=_cmd_export)

    pd = sub.add_parser("predict", help="top-5 classes of image files with a trained checkpoint; --routing shows "
                                        "which experts each image used")
    pd.add_argument("checkpoint")
    pd.add_argument("images", nargs="+", help="image files (any format PIL reads)")
    pd.add_argument("--top", type=int, default=5)
    pd.add_argument("--routing", action="store_true", help="print each MoE layer's experts per image")
    pd.add_argument("--key", type=int, default=None, help="MoCE: predict with the dense model of this cluster id")
    pd.add_argument("--json", action="store_true", help="print JSON")
    pd.set_defaults(fn=_cmd_predict)


def _add_tool_commands(sub) -> None:
    """The subcommands of benchmarks, data, the native build, info."""
    from ..bench import build_parser as bench_parser

    b = bench_parser(sub.add_parser("bench", help="time MoE layers against dense, the naive loop and peers"))
    b.add_argument("--data-parallel", metavar="CONFIG", default=None,
                   help="instead: train CONFIG with 1, 2, ... processes (torchrun) and report images/s, tokens/s "
                        "and all-reduce volume")
    b.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts for --data-parallel")
    b.add_argument("--steps", type=int, default=60, help="training steps per run for --data-parallel")
    b.add_argument("--expert-parallel", action="store_true",
                   help="with --data-parallel: split the experts over the N processes (moe.expert_parallel=N) and "
                        "report the measured all-to-all bytes")
    b.set_defaults(fn=_cmd_bench)

    bd = sub.add_parser("bench-data", help="images/s of the streaming loader (224 px RandomResizedCrop from JPEG) "
                                           "beside a model's training images/s")
    bd.add_argument("root", nargs="?", default=None,
                    help="an image folder (class sub-folders); default: generate one from the bundled photos")
    bd.add_argument("--size", type=int, default=224)
    bd.add_argument("--workers", type=int, default=2)
    bd.add_argument("--batch-size", type=int, default=64)
    bd.add_argument("--batches", type=int, default=20)
    bd.add_argument("--model", default="vit_small_patch16_224",
                    help="model whose training step is timed ('none': skip)")
    bd.add_argument("--model-batch", type=int, default=16)
    bd.add_argument("--model-steps", type=int, default=5)
    bd.add_argument("--threads", type=int, default=None, help="torch threads of the main process")
    bd.add_argument("--device", default="auto")
    bd.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    bd.add_argument("--out", default="runs/bench_data")
    bd.set_defaults(fn=_cmd_bench_data)

    ld = sub.add_parser("list-data", help="list the data sets")
    ld.set_defaults(fn=_cmd_list_data)

    bn = sub.add_parser("build-native", help="compile the CPU expert loop once (used by default for experts of >= "
                        "256 rows; VISIONMOE_NATIVE=1: always, 0: never; C++ compiler and ninja needed; without it "
                        "the experts run one after another)")
    bn.add_argument("--status", action="store_true", help="only say whether it is built and used")
    bn.add_argument("--verbose", action="store_true", help="show the compiler's output")
    bn.set_defaults(fn=_cmd_build_native)

    info = sub.add_parser("info", help="parameters (total and active) and MoE layout of a model or checkpoint")
    info.add_argument("model", help="a registered model name or a checkpoint file")
    info.set_defaults(fn=_cmd_info)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also come after options (`train CFG --resume lr=0.1`)
    if extra and (not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        if args.allow_unverified:
            from ..train.checkpoint import allow_unverified_checkpoints

            with allow_unverified_checkpoints():
                return args.fn(args)
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"visionmoe: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # permissions, a full disk, a directory where a file was named: one line, the path
        where = f": {e.filename}" if e.filename else ""
        print(f"visionmoe: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = (f"; continue with: visionmoe {' '.join(argv if argv is not None else sys.argv[1:])} --resume"
                if args.command == "train" and "--resume" not in (argv if argv is not None else sys.argv[1:]) else "")
        print(f"visionmoe: interrupted{hint}", file=sys.stderr)
        return 130
    except RuntimeError as e:
        from ..train import TrainingDiverged

        if not isinstance(e, TrainingDiverged):
            raise
        print(f"visionmoe: training stopped: {e}", file=sys.stderr)
        return 3


def console_main() -> int:
    """The ``visionmoe`` program: :func:`main` after the process-level settings the
    environment gives (:func:`visionmoe.cli.environment.apply_environment`: the CPU allocator,
    the compiled expert loop's mode and cache). :func:`main` itself leaves the process alone,
    for callers that embed it."""
    from .environment import apply_environment

    try:
        apply_environment()
    except ValueError as e:  # a mistyped VISIONMOE_MALLOC / VISIONMOE_NATIVE
        print(f"visionmoe: error: {e}", file=sys.stderr)
        return 2
    try:
        return main()
    finally:  # under torchrun: leave the process group (an undestroyed gloo group can abort at exit)
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(console_main())
