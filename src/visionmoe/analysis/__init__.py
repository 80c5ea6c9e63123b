"""Routing and model analysis."""

from .gradients import gradient_magnitude_scores
from .routing import (
    cdf,
    class_expert_table,
    collect_routing,
    distinct_experts,
    dominant_expert_share,
    expert_similarity,
    patches_per_expert,
    routing_degree,
    routing_paths,
)

__all__ = ["gradient_magnitude_scores", "class_expert_table", "dominant_expert_share", "collect_routing",
           "distinct_experts", "cdf", "patches_per_expert", "expert_similarity", "routing_degree", "routing_paths"]
