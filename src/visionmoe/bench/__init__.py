"""Benchmarks, one home: ``visionmoe bench`` (:mod:`.run`: MoE layers vs dense, the naive loop,
peers, the ViT step, scaling; :mod:`.cases`, :mod:`.measure`), ``visionmoe bench-data``
(:mod:`.data`: loader throughput vs a training step) and ``visionmoe bench --data-parallel``
(:mod:`.data_parallel`: 1..N processes under torchrun)."""

from .cases import Case, activation_bytes, layer_cases, scaling_cases, vit_cases
from .data import loader_throughput, run_data_bench
from .data_parallel import benchmark_data_parallel
from .measure import add_traffic_estimate, memory_bandwidth, paired_ratios, split_gemm_ratio
from .run import build_parser, main, run_bench, run_from_args

__all__ = ["Case", "activation_bytes", "layer_cases", "scaling_cases", "vit_cases", "loader_throughput",
           "run_data_bench", "benchmark_data_parallel", "add_traffic_estimate", "memory_bandwidth", "paired_ratios",
           "split_gemm_ratio", "build_parser", "main", "run_bench", "run_from_args"]
