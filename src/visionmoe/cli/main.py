"""The ``visionmoe`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

__all__ = ["main"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..recipes.demo import run_demo

    res = run_demo(quick=args.quick, seed=args.seed, out=args.out, progress=not args.no_progress)
    return 0 if res["test_accuracy"] > 0.1 else 1


def _cmd_moce_demo(args: argparse.Namespace) -> int:
    from ..recipes.moce_demo import MoCEDemoConfig, run_moce_demo

    cfg = MoCEDemoConfig.quick() if args.quick else MoCEDemoConfig()
    if args.seeds:
        cfg.seeds = list(range(args.seeds))
    res = run_moce_demo(cfg, out=args.out, progress=not args.no_progress)
    return 0 if res["tasks"] else 1


def _cmd_list_models(args: argparse.Namespace) -> int:
    from ..models import list_models
    from ..models._registry import _REGISTRY

    for name in list_models(args.pattern):
        print(f"{name:32s} {_REGISTRY[name].description}")
    return 0


def _model_from_checkpoint(path: str):
    from ..train import build_model, config_from_dict, load_checkpoint

    ck = load_checkpoint(path)
    st = ck["state"]
    cfg = config_from_dict(st["config"])
    model = build_model(cfg, num_classes=st["num_classes"], in_chans=st["in_chans"])
    model.load_state_dict(ck["model"])
    return model, cfg, st, ck


def _cmd_info(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ..models import count_parameters, create_model

    if Path(args.model).is_file():
        model, cfg, st, _ = _model_from_checkpoint(args.model)
        print(f"checkpoint {args.model}: model {cfg.model.name}, step {st['step']}, data {cfg.data.name} "
              f"({st['num_classes']} classes, {st['in_chans']} channels, {st['img_size']} px)")
        name = cfg.model.name
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

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        config, overrides = None, [config, *overrides]  # only overrides were given
    cfg = load_config(config, overrides)
    trainer = Trainer(cfg, run_dir=args.run_dir)
    summary = trainer.fit(resume=args.resume)
    print(json.dumps({k: v for k, v in summary.items() if k != "routing"}, indent=2))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from ..data import adapt, load_dataset
    from ..train import Trainer

    model, cfg, st, _ = _model_from_checkpoint(args.checkpoint)
    if args.data:
        cfg.data.name = args.data
        cfg.data.args = {}
    for item in args.data_arg:
        k, v = item.split("=", 1)
        cfg.data.args[k] = yaml.safe_load(v)
    data = load_dataset(cfg.data.name, **cfg.data.args)
    if data.num_classes != st["num_classes"]:
        raise ValueError(f"the checkpoint predicts {st['num_classes']} classes but {data.name!r} has "
                         f"{data.num_classes}; evaluate on a data set with the same classes")
    cfg.run.progress = False
    trainer = Trainer(cfg, data=data, model=model, run_dir=Path(args.checkpoint).parent)
    trainer._x_test = adapt(data.x_test, channels=st["in_chans"], size=st["img_size"])
    res = trainer.evaluate(model)
    print(json.dumps(res, indent=2))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from ..bench import run_from_args

    run_from_args(args)
    return 0


def _cmd_list_data(args: argparse.Namespace) -> int:
    from ..data import list_datasets

    for name, info in list_datasets().items():
        print(f"{name:14s} {info.description}  [licence: {info.licence}]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="visionmoe", description="Vision Mixture-of-Experts: train, analyse, deploy.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train a small V-MoE on bundled real images and show its routing")
    d.add_argument("--quick", action="store_true", help="a shorter run (~15 s)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    d.set_defaults(fn=_cmd_demo)

    md = sub.add_parser("moce-demo", help="MoCE end to end (MAE, clustering, MoCE vs MAE* vs TokenMoE, transfer)")
    md.add_argument("--quick", action="store_true", help="small sizes, one seed (a few minutes)")
    md.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, quick 1)")
    md.add_argument("--out", default="runs/moce_demo")
    md.add_argument("--no-progress", action="store_true")
    md.set_defaults(fn=_cmd_moce_demo)

    lm = sub.add_parser("list-models", help="list registered model variants")
    lm.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'vmoe*'")
    lm.set_defaults(fn=_cmd_list_models)

    t = sub.add_parser("train", help="train from a YAML config with key=value overrides")
    t.add_argument("config", nargs="?", default=None, help="YAML experiment file (configs/...)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. moe.num_experts=16 optim.lr=5e-4")
    t.add_argument("--run-dir", default=None, help="run folder (default run.out_dir/run.name)")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    t.set_defaults(fn=_cmd_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint on its data set or another one")
    ev.add_argument("checkpoint")
    ev.add_argument("--data", default=None, help="data set name (default: the one it was trained on)")
    ev.add_argument("--data-arg", action="append", default=[], help="loader argument key=value, repeatable")
    ev.set_defaults(fn=_cmd_eval)

    from ..bench import build_parser as bench_parser

    b = bench_parser(sub.add_parser("bench", help="time MoE layers against dense, the naive loop and peers"))
    b.set_defaults(fn=_cmd_bench)

    ld = sub.add_parser("list-data", help="list the data sets")
    ld.set_defaults(fn=_cmd_list_data)

    info = sub.add_parser("info", help="parameters (total and active) and MoE layout of a model or checkpoint")
    info.add_argument("model", help="a registered model name or a checkpoint file")
    info.set_defaults(fn=_cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"visionmoe: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
