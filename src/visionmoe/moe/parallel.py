"""Expert parallelism: each of P ranks holds E/P experts; tokens travel by all-to-all.

Axis legend: E experts in all, P ranks in an expert-parallel group, L = E/P experts per
rank, N rows this rank routed (sorted by expert), R rows this rank receives, D width.

The world of W ranks is cut into W/P expert-parallel groups of consecutive ranks
(``[0..P-1], [P..2P-1], ...``). Inside a group, rank ``i`` holds experts ``i*L .. i*L+L-1``
of every MoE layer; routers, attention and everything else are replicated as in data
parallelism. A forward of one MoE layer (:func:`expert_parallel_forward`):

1. every rank routes its own tokens and sorts them by expert (the dispatcher, unchanged);
2. the per-expert row counts are exchanged (``all_to_all_single`` of E integers), so every
   rank knows how many rows it will receive from whom;
3. the rows themselves go to the ranks holding their experts (``all_to_all_single`` with
   uneven splits), are regrouped by local expert, run through the local experts (the same
   kernels as on one process) and come back by the reverse all-to-all, in the order they
   left. The dispatcher then combines them exactly as without expert parallelism.

The exchange is ``torch.distributed.all_to_all_single`` in a small autograd function whose
backward is the reverse exchange, so gradients reach both the inputs and the experts. Gloo,
the CPU backend, implements ``all_to_all_single`` in this PyTorch (2.14), so the same code
runs on CPUs (gloo) and GPUs (NCCL).

Gradients: an expert's gradient already holds the contributions of every rank of its group
(they flowed back through the all-to-all), so it is **not** all-reduced over that group; it
is all-reduced only over the ranks holding the same experts in other groups (the
"expert-data-parallel" group, of size W/P). Everything else is all-reduced over all ranks.
:func:`reduce_gradients` does both and divides by W, which is the gradient of the mean loss
over the global batch.

Checkpoints stay layout-independent: :func:`gather_expert_state` assembles the full
``(E, ...)`` tensors before rank 0 writes, and :func:`shard_expert_state` takes this rank's
rows out of a full tensor on load, so a checkpoint moves between 1, P and M ranks.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .experts import Experts

__all__ = ["sent_bytes", "ExpertParallel", "ExpertShard", "expert_parallel_groups", "shard_experts", "sharded_experts",
           "expert_parallel_forward", "gather_expert_state", "shard_expert_state", "gather_optimizer_state",
           "shard_optimizer_state", "reduce_gradients", "sharded_parameters"]

_PARAMS = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
# process groups by key; kept out of the modules so that ``copy.deepcopy`` (EMA, MoCo's
# momentum encoder) copies a plain key, not a process group handle. Weak references:
# torch.distributed owns its groups, and ``destroy_process_group`` must free them (and join
# their gloo worker threads) then, not at the interpreter's teardown, where a worker that
# still drops a finished collective's tensors needs the GIL, finds the interpreter
# finalising and aborts the process ("terminate called without an active exception").
# Nothing here holds a group strongly: not the modules, not an autograd context.
_GROUPS: dict[int, tuple[Callable[[], object] | None, Callable[[], object] | None]] = {}


def _group_ref(group) -> Callable[[], object] | None:
    return None if group is None else weakref.ref(group)


def _group(key: int, which: int):
    ref = _GROUPS[key][which]
    if ref is None:
        return None
    group = ref()
    if group is None:
        raise RuntimeError("the process group of these expert-parallel layers was destroyed "
                           "(dist.destroy_process_group); after init_process_group, shard a new model")
    return group


@dataclass(frozen=True)
class ExpertShard:
    """Which experts one rank holds: experts ``start .. start + local - 1`` of ``num_experts``.

    Attributes:
        rank: this rank's position in its expert-parallel group.
        size: P, ranks in the group.
        num_experts: E of the whole layer.
        key: key of the (expert-parallel group, expert-data-parallel group) pair.
    """

    rank: int
    size: int
    num_experts: int
    key: int

    @property
    def local(self) -> int:
        return self.num_experts // self.size

    @property
    def start(self) -> int:
        return self.rank * self.local

    @property
    def group(self):
        """The expert-parallel process group (ranks that split the experts)."""
        return _group(self.key, 0)

    @property
    def replica_group(self):
        """The ranks that hold the same experts (None when there is only this one)."""
        return _group(self.key, 1)


def expert_parallel_groups(size: int) -> ExpertShard:
    """Create the process groups for expert parallelism over ``size`` ranks (every rank must
    call this, in the same order) and return this rank's place, with ``num_experts=0`` (set
    per layer by :func:`shard_experts`)."""
    if not dist.is_initialized():
        raise RuntimeError(
            f"moe.expert_parallel={size} needs torch.distributed; start with "
            f"`torchrun --nproc_per_node={size} -m visionmoe train ...` (or set moe.expert_parallel=1)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if size < 1 or world % size:
        raise ValueError(f"moe.expert_parallel={size} must divide the number of processes ({world})")
    key = len(_GROUPS)
    ep_group = rep_group = None
    if size == world:
        ep_group = dist.group.WORLD
    for g in range(world // size):  # every rank creates every group, in the same order
        ranks = list(range(g * size, (g + 1) * size))
        grp = dist.new_group(ranks) if size != world else None
        if rank in ranks and grp is not None:
            ep_group = grp
    if world > size:
        for i in range(size):
            ranks = list(range(i, world, size))
            grp = dist.new_group(ranks)
            if rank in ranks:
                rep_group = grp
    _GROUPS[key] = (_group_ref(ep_group), _group_ref(rep_group))
    return ExpertShard(rank=rank % size, size=size, num_experts=0, key=key)


class ExpertParallel(Experts):
    """The experts of one MoE layer split over an expert-parallel group, in place of its
    :class:`Experts` (``layer.experts = ExpertParallel(layer.experts, shard)``; megablocks'
    switch of ``forward_fn``): this rank holds experts ``shard.start .. shard.start +
    shard.local - 1`` of ``num_experts``, under the same parameter names (so state-dict keys
    do not change), and :meth:`forward_gathered` runs :func:`expert_parallel_forward`.
    ``sent_bytes`` counts what its all-to-alls sent to other ranks (read by :func:`sent_bytes`)."""

    fuses_combine = False  # the combine runs after the rows come back from the other ranks

    def __init__(self, experts: Experts, shard: ExpertShard):
        nn.Module.__init__(self)
        if isinstance(experts, ExpertParallel):
            raise ValueError("these experts are split over ranks already")
        for attr in ("impl", "recompute", "threads", "num_experts", "dim", "hidden", "gated", "act", "drop"):
            setattr(self, attr, getattr(experts, attr))
        rows = slice(shard.start, shard.start + shard.local)
        for name, p in experts.named_parameters(recurse=False):  # in its order: optimizer states follow it
            self.register_parameter(name, nn.Parameter(p.detach()[rows].clone(), requires_grad=p.requires_grad))
        for name in _PARAMS:
            if not hasattr(self, name):  # no biases
                self.register_parameter(name, None)
        self.shard, self.sent_bytes = shard, 0

    def forward_gathered(self, x: Tensor, rows: Tensor, counts: Tensor | list[int], impl: str | None = None) -> Tensor:
        """As :meth:`Experts.forward_gathered` (``counts`` has all E entries), across the group."""
        if len(counts) != self.num_experts:
            raise ValueError(f"counts must have {self.num_experts} entries, got {len(counts)}")
        return expert_parallel_forward(self, x, rows, counts, impl)

    def expert(self, x: Tensor, e: int) -> Tensor:
        raise RuntimeError(
            f"Experts.expert needs every expert, but this rank holds experts {self.shard.start}.."
            f"{self.shard.start + self.shard.local - 1} of {self.num_experts} (expert parallelism); load the "
            "layout-independent checkpoint into an unsharded model (visionmoe.train.load_trained_model)")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", holds={self.shard.start}..{self.shard.start + self.shard.local - 1}"


def sharded_experts(model: nn.Module) -> Iterator[tuple[str, ExpertParallel]]:
    """``(name, module)`` of every :class:`ExpertParallel` of ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, ExpertParallel):
            yield name, m


def sharded_parameters(model: nn.Module) -> dict[int, ExpertShard]:
    """``id`` -> shard of every parameter that is a shard of the expert weights."""
    return {id(p): m.shard for _, m in sharded_experts(model) for p in m.parameters(recurse=False)}


def shard_experts(model: nn.Module, size: int, place: ExpertShard | None = None) -> int:
    """Replace every :class:`Experts` of ``model`` by an :class:`ExpertParallel` holding this
    rank's E/P experts (``model`` built the same on every rank, e.g. from the same seed, so
    the shards are slices of one model). Returns the number of layers sharded. ``place``
    defaults to ``expert_parallel_groups(size)``."""
    if size == 1:
        return 0
    from .soft import SoftMoE

    soft = [name for name, m in model.named_modules() if isinstance(m, SoftMoE)]
    if soft:
        raise ValueError(f"Soft MoE layers ({soft[0]}, ...) run every expert on every image's slots and do not "
                         "split over ranks: use moe.expert_parallel=1 (data parallelism) with router: soft")
    place = place or expert_parallel_groups(size)
    todo = [(name, m) for name, m in model.named_modules()
            if isinstance(m, Experts) and not isinstance(m, ExpertParallel)]
    for name, m in todo:  # every check before the first replacement
        if not name:
            raise ValueError("shard_experts takes the model (or MoE layer) that holds the Experts, not the Experts")
        if m.num_experts % size:
            raise ValueError(f"{name}: {m.num_experts} experts cannot be split over moe.expert_parallel={size} "
                             "ranks; choose a divisor of moe.num_experts")
    for name, m in todo:
        ep = ExpertParallel(m, ExpertShard(place.rank, size, m.num_experts, place.key))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, ep)
    return len(todo)


def sent_bytes(model: nn.Module) -> int:
    """Bytes this process has sent to other ranks through the expert-parallel all-to-alls of
    ``model`` (rows and counts out, gradients back), summed over its sharded layers; a
    caller reads the difference around a step."""
    return sum(m.sent_bytes for _, m in sharded_experts(model))


def _exchange(out: Tensor, x: Tensor, out_splits: list[int], in_splits: list[int], group,
              experts: ExpertParallel) -> Tensor:
    me = dist.get_rank(group)
    experts.sent_bytes += (sum(in_splits) - in_splits[me]) * (x[0].numel() if len(x) else 0) * x.element_size()
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with uneven splits whose backward is the reverse exchange, over
    ``experts.shard.group``. The context keeps the layer (whose shard looks its group up), not
    the group: the gloo work of the exchange keeps its output, the output keeps this node, and
    a group on the node would close a cycle through C++ that keeps the group alive after
    destroy_process_group."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], experts: ExpertParallel) -> Tensor:
        ctx.splits, ctx.experts = (out_splits, in_splits), experts
        return _exchange(x.new_empty((sum(out_splits),) + tuple(x.shape[1:])), x, out_splits, in_splits,
                         experts.shard.group, experts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        return _exchange(back, grad, in_splits, out_splits, ctx.experts.shard.group, ctx.experts), None, None, None


def _a2a(x: Tensor, out_splits: list[int], in_splits: list[int], experts: ExpertParallel) -> Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, experts)


def expert_parallel_forward(experts: ExpertParallel, x: Tensor, rows: Tensor, counts: Tensor | list[int],
                            impl: str | None = None) -> Tensor:
    """:meth:`Experts.forward_gathered` across the expert-parallel group: ``x: (M, D)``,
    ``rows: (N,)`` sorted by expert, ``counts: (E,)`` rows per (global) expert -> ``(N, D)``
    outputs in the order of ``rows``. Every rank of the group must call it together."""
    sh = experts.shard
    group, P, L = sh.group, sh.size, sh.local
    counts = torch.as_tensor(counts, dtype=torch.int64).to(x.device)  # (E,) on x's device: NCCL needs CUDA
    recv_counts = _exchange(torch.empty_like(counts), counts, [L] * P, [L] * P, group, experts).cpu()  # (P*L,):
    counts = counts.cpu()  # entry s*L + l of recv_counts = rows from rank s for local expert l
    send_splits = counts.view(P, L).sum(1).tolist()  # rows for each rank (sorted by expert = by rank)
    rc = recv_counts.view(P, L)
    recv_splits = rc.sum(1).tolist()
    xs = x.index_select(0, rows)  # (N, D)
    xr = _a2a(xs, recv_splits, send_splits, experts)  # (R, D) by source rank, then local expert
    # regroup by local expert: segment (s, l) starts at starts[s, l]; visit them l-major
    flat = rc.reshape(-1)
    starts = (flat.cumsum(0) - flat).view(P, L).t().reshape(-1)  # (L*P,)
    lens = rc.t().reshape(-1)  # (L*P,)
    seg_offset = lens.cumsum(0) - lens
    total = int(flat.sum())
    order = (torch.repeat_interleave(starts - seg_offset, lens, output_size=total)
             + torch.arange(total)).to(x.device)  # (R,) row of xr for each expert-sorted slot
    local_counts = rc.sum(0).tolist()  # (L,)
    ys_local = experts.forward_local(xr, order, local_counts, impl)  # (R, D) sorted by local expert
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(total, device=order.device)
    yr = ys_local.index_select(0, inverse)  # (R, D) back in received order
    return _a2a(yr, send_splits, recv_splits, experts)  # (N, D) in the order of rows


def _gather_rows(t: Tensor, sh: ExpertShard) -> Tensor:
    parts = [torch.empty_like(t) for _ in range(sh.size)]
    dist.all_gather(parts, t.contiguous(), group=sh.group)
    return torch.cat(parts, 0)


def gather_expert_state(model: nn.Module, sd: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """``sd`` (``model.state_dict()``) with every expert shard replaced by the full
    ``(E, ...)`` tensor of its layer: the layout-independent form. Collective: every rank
    of the expert-parallel groups calls it; a model without shards returns ``sd`` as is."""
    out = dict(sd)
    for name, m in sharded_experts(model):
        for pname in _PARAMS:
            key = f"{prefix}{name}.{pname}"
            if key in out:
                out[key] = _gather_rows(out[key], m.shard)
    return out


def shard_expert_state(model: nn.Module, sd: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """The inverse of :func:`gather_expert_state`: full ``(E, ...)`` expert tensors of ``sd``
    cut to the rows this rank holds (tensors already of the shard's size are kept)."""
    out = dict(sd)
    for name, m in sharded_experts(model):
        sh = m.shard
        for pname in _PARAMS:
            key = f"{prefix}{name}.{pname}"
            if key in out and out[key].shape[0] == sh.num_experts != sh.local:
                out[key] = out[key][sh.start: sh.start + sh.local].clone()
    return out


def _optimizer_shards(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[int, ExpertShard]:
    """Optimizer state index -> shard, for the sharded expert parameters."""
    owner = sharded_parameters(model)
    out, i = {}, 0
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) in owner:
                out[i] = owner[id(p)]
            i += 1
    return out


def _map_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, osd: dict, fn) -> dict:
    """``osd`` with ``fn(tensor, shard)`` applied to every per-expert state tensor (Adam
    moments, ...) of the sharded parameters; other entries are kept as they are."""
    shards = _optimizer_shards(optimizer, model)
    if not shards:
        return osd
    state = {}
    for i, st in osd["state"].items():
        sh = shards.get(int(i))
        state[i] = st if sh is None else {
            k: fn(v, sh) if isinstance(v, Tensor) and v.dim() > 0 else v for k, v in st.items()}
    return {**osd, "state": state}


def gather_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, osd: dict) -> dict:
    """``optimizer.state_dict()`` with the per-expert state of sharded parameters gathered to
    full ``(E, ...)`` tensors. Collective, like :func:`gather_expert_state`."""
    return _map_optimizer_state(optimizer, model, osd,
                                lambda v, sh: _gather_rows(v, sh) if v.shape[0] == sh.local else v)


def shard_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, osd: dict) -> dict:
    """The inverse of :func:`gather_optimizer_state` for this rank."""
    return _map_optimizer_state(
        optimizer, model, osd,
        lambda v, sh: v[sh.start: sh.start + sh.local].clone() if v.shape[0] == sh.num_experts != sh.local else v)


def reduce_gradients(params: list[Tensor], sharded: Mapping[int, ExpertShard], world: int) -> None:
    """Data-parallel gradient averaging that knows about expert shards: replicated
    parameters are summed over all ranks, expert shards (``sharded``: parameter ``id`` ->
    shard, from :func:`sharded_parameters`) only over the ranks that hold the same experts
    (their expert-parallel group already contributed through the all-to-all); both are
    divided by ``world``. A replicated parameter that no rank used keeps ``grad=None``.
    Collective."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    def all_reduce(ps: list[Tensor], group=None) -> list[Tensor]:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in ps]
        had = torch.tensor([float(p.grad is not None) for p in ps], dtype=grads[0].dtype, device=grads[0].device)
        flat = _flatten_dense_tensors([*grads, had])
        dist.all_reduce(flat, group=group)  # group None: all ranks
        *out, had = _unflatten_dense_tensors(flat, [*grads, had])
        return [g / world if h > 0 else None for g, h in zip(out, had)]

    replicated = [p for p in params if id(p) not in sharded]
    if replicated:
        for p, g in zip(replicated, all_reduce(replicated)):
            p.grad = g  # None: no rank used it (as in one process)
    by_group: dict[int, list[Tensor]] = {}
    for p in params:
        if id(p) in sharded:
            by_group.setdefault(sharded[id(p)].key, []).append(p)
    for key, ps in by_group.items():
        rep = _group(key, 1)  # None: no other rank holds these experts, nothing to sum
        for p, g in zip(ps, all_reduce(ps, rep) if rep is not None else _local(ps, world)):
            p.grad = g


def _local(ps: list[Tensor], world: int) -> list[Tensor]:
    return [(p.grad if p.grad is not None else torch.zeros_like(p)) / world for p in ps]
