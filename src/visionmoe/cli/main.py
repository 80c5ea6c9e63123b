"""The ``visionmoe`` command line."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..recipes.demo import run_demo

    res = run_demo(quick=args.quick, seed=args.seed, out=args.out, progress=not args.no_progress)
    return 0 if res["test_accuracy"] > 0.1 else 1


def _cmd_list_models(args: argparse.Namespace) -> int:
    from ..models import list_models
    from ..models._registry import _REGISTRY

    for name in list_models(args.pattern):
        print(f"{name:32s} {_REGISTRY[name].description}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from ..models import count_parameters, create_model

    with torch.device("meta"):
        model = create_model(args.model)
    c = count_parameters(model)
    print(f"{args.model}: {c['total'] / 1e6:.2f}M parameters, {c['active'] / 1e6:.2f}M active per token")
    if getattr(model, "is_moe", False):
        cfg = model.moe_config
        print(f"MoE blocks {model.moe_blocks}: {cfg.num_experts} experts, top-{cfg.top_k}, router {cfg.router}, "
              f"routing {cfg.routing}, capacity factor {cfg.capacity_factor} (eval {cfg.eval_capacity_factor})")
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

    lm = sub.add_parser("list-models", help="list registered model variants")
    lm.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'vmoe*'")
    lm.set_defaults(fn=_cmd_list_models)

    info = sub.add_parser("info", help="parameters (total and active) and MoE layout of a model variant")
    info.add_argument("model")
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
