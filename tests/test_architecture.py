"""The layering of docs/architecture.md holds: no package imports one above it, no private
name crosses a package boundary, and a new router needs only its class (registry by decorator)."""

import ast
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1] / "src" / "visionmoe"
LAYER = {"_utils": 0, "moe": 1, "data": 1, "objectives": 1, "clustering": 1, "runtime": 1, "models": 2,
         "analysis": 2, "export": 2, "train": 3, "eval": 4, "sweep": 4, "bench": 4,
         "recipes": 5, "cli": 6, "__main__": 7, "__init__": 7}


def _imports():
    """(importing package, imported package, names, file) for every relative import across packages."""
    for f in ROOT.rglob("*.py"):
        rel = f.relative_to(ROOT)
        pkg = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.ImportFrom) or node.level == 0:
                continue
            if len(rel.parts) > 1 and node.level == 1:  # inside the same package
                continue
            target = (node.module or "").split(".")[0]
            if target and target != pkg:
                yield pkg, target, [a.name for a in node.names], rel


def test_every_package_is_in_a_layer():
    found = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    assert found <= set(LAYER), sorted(found - set(LAYER))


def test_no_package_imports_a_layer_above_it():
    up = [(a, b, str(f)) for a, b, _, f in _imports() if LAYER[b] > LAYER[a]]
    assert not up, up


def test_no_private_name_crosses_a_package():
    private = [(a, b, n, str(f)) for a, b, names, f in _imports() for n in names
               if n.startswith("_") and not n.startswith("__")]
    assert not private, private


def test_a_toy_router_needs_only_its_class():
    from visionmoe.moe import MoEConfig, Router, build_moe
    from visionmoe.moe.routers import ROUTERS, register_router

    @register_router("toy_first_expert")
    class FirstExpert(Router):  # every token to expert 0: the logits favour it by 10
        def __init__(self, dim, num_experts, k=1, **kw):
            super().__init__(num_experts, k, **kw)
            self.dim = dim

        def compute_logits(self, x, key=None):
            return torch.zeros(x.shape[0], self.num_experts).index_fill_(1, torch.tensor([0]), 10.0)

    try:
        layer = build_moe(8, 16, MoEConfig(num_experts=3, router="toy_first_expert", noise_std=0.0))
        layer(torch.randn(5, 8))
        assert layer.last.expert_counts.tolist() == [5, 0, 0]
    finally:
        ROUTERS.pop("toy_first_expert")


def test_the_library_reads_no_environment_variables():
    """Settings come in as options; the environment is turned into them in one place, the
    CLI's environment module, and torchrun's rendezvous contract is read in one function."""
    allowed = {Path("cli/environment.py"), Path("train/distributed.py"),
               Path("bench/data_parallel.py")}  # the last only copies it into its torchrun children
    reads = []
    for f in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
            if name in ("environ", "getenv", "putenv"):
                reads.append(f.relative_to(ROOT))
    assert set(reads) <= allowed, sorted(set(map(str, reads)) - set(map(str, allowed)))
    dist_src = (ROOT / "train" / "distributed.py").read_text()
    assert dist_src.count("os.environ.get(") + dist_src.count("os.environ[") == 3  # WORLD_SIZE, LOCAL_RANK, RANK
