"""Data-parallel training with PyTorch's own engine: ``torchrun`` sets ``RANK`` /
``WORLD_SIZE`` / ``LOCAL_RANK``; :func:`init_distributed` joins the process group (NCCL on
GPUs, gloo on CPUs) and the :class:`~visionmoe.train.Trainer` averages the gradients over the
ranks (DistributedDataParallel's arithmetic, expert shards aware: see
:mod:`visionmoe.moe.parallel`), gives each rank ``1/world`` of every global batch, reduces
metrics and routing statistics across ranks and writes logs and checkpoints on rank 0 only.
Checkpoints hold full tensors (experts as ``(E, D, H)``), so they load on any number of ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "all_reduce_sums", "barrier", "benchmark_data_parallel"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def launch_ranks() -> tuple[int, int, int]:
    """``(rank, world, local_rank)`` as the launcher (``torchrun``) gives them: the one place
    the library reads the environment, because torch.distributed's ``env://`` rendezvous is
    defined by these variables; ``(0, 1, 0)`` in a plain process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return (int(os.environ["RANK"]) if world > 1 else 0), world, local


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group ``torchrun`` describes (once); a plain process gets rank 0 of 1.
    ``backend``: ``nccl`` for CUDA runs, ``gloo`` for CPU ones (default: by CUDA's presence)."""
    rank, world, local = launch_ranks()
    if world <= 1:
        return DistInfo()
    if not dist.is_available():  # pragma: no cover
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl" and not torch.cuda.is_initialized():
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world=dist.get_world_size(), local_rank=local)


def all_reduce_sums(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Sum every value of ``values`` over the ranks (keys must agree across ranks)."""
    if not info.enabled or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return dict(zip(keys, t.cpu().tolist()))


def collective_device() -> torch.device:
    """Where tensors for collectives live: the current CUDA device under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def benchmark_data_parallel(config: str, *, nprocs: tuple[int, ...] = (1, 2), steps: int = 60, threads: int = 2,
                            overrides: tuple[str, ...] = (), out: str = "runs/bench_dp",
                            expert_parallel: bool = False) -> list[dict]:
    """Train ``config`` for ``steps`` steps with 1, 2, ... processes (``torchrun --standalone``,
    ``threads`` CPU threads shared among them) and report images/s and tokens/s of the global
    batch and the communication per step and rank: the gradient all-reduce volume (ring
    all-reduce: each rank sends 2 (N-1)/N times the fp32 gradients it all-reduces) and, with
    ``expert_parallel`` (``moe.expert_parallel=N`` for N processes: each holds E/N experts),
    the all-to-all bytes measured while training. Writes ``bench_dp.json`` and ``bench_dp.md``."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from ..moe.experts import Experts
    from .build import build_model
    from .config import load_config

    cfg = load_config(config, list(overrides))
    model = build_model(cfg, num_classes=10, in_chans=cfg.data.channels or 1)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_expert = sum(p.numel() for m in model.modules() if isinstance(m, Experts) for p in m.parameters())
    pe = getattr(model, "patch_embed", None)
    tokens = (pe.num_patches + getattr(model, "num_prefix_tokens", 0)) if pe is not None else None
    rows = []
    outp = Path(out)
    for n in nprocs:
        run_dir = outp / (f"ep{n}" if expert_parallel else f"np{n}")
        per = max(1, threads // n)
        ep = expert_parallel and n > 1
        args = ["-m", "visionmoe", "train", config, *overrides, f"schedule.max_steps={steps}", f"run.threads={per}",
                "run.progress=false", "run.eval_every_epochs=1000000", "run.checkpoint_every=1000000000",
                "run.log_every=1000000", *([f"moe.expert_parallel={n}"] if ep else []), "--run-dir", str(run_dir)]
        cmd = [sys.executable, *args] if n == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args]
        child_env = dict(os.environ, OMP_NUM_THREADS=str(per))  # the children's OpenMP pool at start-up
        r = subprocess.run(cmd, env=child_env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{n}-process run failed:\n{r.stderr[-2000:]}")
        s = json.loads((run_dir / "summary.json").read_text())
        ips = s["train_img_per_s"]
        reduced = n_params - n_expert if ep else n_params  # expert shards are not all-reduced (one group of n)
        rows.append({"processes": n, "threads_each": per, "expert_parallel": n if ep else 1, "img_per_s": ips,
                     "tokens_per_s": ips * tokens if tokens else None,
                     "allreduce_mb_per_rank_per_step": 2 * (n - 1) / n * 4 * reduced / 1e6,
                     "all_to_all_mb_per_rank_per_step": s.get("all_to_all_mb_per_step", 0.0),
                     "params": n_params, "expert_params": n_expert})
    outp.mkdir(parents=True, exist_ok=True)
    (outp / "bench_dp.json").write_text(json.dumps({"config": config, "steps": steps, "rows": rows}, indent=2))
    kind = "Expert-parallel" if expert_parallel else "Data-parallel"
    lines = [f"{kind} throughput, `{config}`, {steps} steps, {threads} threads in all", "",
             "| processes | threads each | experts split over | images/s | tokens/s | all-reduce MB | all-to-all MB |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['processes']} | {r['threads_each']} | {r['expert_parallel']} | {r['img_per_s']:.0f} | "
              f"{(r['tokens_per_s'] or 0):,.0f} | {r['allreduce_mb_per_rank_per_step']:.2f} | "
              f"{r['all_to_all_mb_per_rank_per_step']:.2f} |" for r in rows]
    lines += ["", "MB: sent per rank per training step (all-reduce: ring estimate; all-to-all: measured)."]
    (outp / "bench_dp.md").write_text("\n".join(lines) + "\n")
    return rows
