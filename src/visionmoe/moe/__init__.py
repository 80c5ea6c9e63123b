"""V-MoE machinery: routers, experts, dispatch, the MoE layer, losses, placement, upcycling."""

from . import losses
from .config import ROUTERS, ROUTINGS, MoEConfig, build_moe
from .dispatch import DispatchInfo, SortedDispatcher, compute_capacity, kept_assignments
from .experts import Experts
from .layer import (
    COMPILE_SETTINGS,
    MoE,
    MoEResult,
    collect_aux_loss,
    collect_routing_stats,
    compile_settings,
    moe_layers,
    routing_key,
)
from .placement import list_placements, resolve_placement
from .routers import (
    ClusterRouter,
    CosineRouter,
    L2Router,
    LinearRouter,
    PooledRouter,
    Router,
    RouterOutput,
    TaskRouter,
    update_balance_biases,
)
from .soft import SoftMoE, SoftRouter
from .upcycle import (
    ChannelsFirst,
    extract_expert_state_dict,
    mlp_blocks,
    moeify,
    upcycle_mlp_state_dict,
    upcycle_state_dict,
)

__all__ = [
    "losses",
    "MoE",
    "MoEResult",
    "MoEConfig",
    "build_moe",
    "ROUTERS",
    "ROUTINGS",
    "Experts",
    "SortedDispatcher",
    "DispatchInfo",
    "compute_capacity",
    "kept_assignments",
    "Router",
    "RouterOutput",
    "LinearRouter",
    "CosineRouter",
    "L2Router",
    "PooledRouter",
    "ClusterRouter",
    "TaskRouter",
    "SoftMoE",
    "SoftRouter",
    "update_balance_biases",
    "moe_layers",
    "collect_aux_loss",
    "collect_routing_stats",
    "compile_settings",
    "COMPILE_SETTINGS",
    "routing_key",
    "resolve_placement",
    "list_placements",
    "moeify",
    "mlp_blocks",
    "ChannelsFirst",
    "upcycle_state_dict",
    "upcycle_mlp_state_dict",
    "extract_expert_state_dict",
]
