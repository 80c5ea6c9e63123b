"""``visionmoe bench --data-parallel CONFIG``: images/s and communication per step with 1, 2, ...
processes under ``torchrun --standalone``."""

from __future__ import annotations

import os

__all__ = ["benchmark_data_parallel"]


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
    from ..train import build_model
    from ..train.config import load_config

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
