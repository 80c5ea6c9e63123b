"""Run by tests/train/test_expert_parallel.py under ``torchrun --nproc_per_node=2``: expert-
parallel MoE layers and a V-MoE against the same modules in one process. Writes the largest
differences (outputs, input gradients, replicated and expert gradients) as JSON."""

import copy
import json
import sys
import weakref

import torch
import torch.distributed as dist

from visionmoe.models import create_model
from visionmoe.moe import MoEConfig, build_moe
from visionmoe.moe.parallel import _GROUPS, gather_expert_state, reduce_gradients, shard_experts, sharded_parameters

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)
out_path, save_dir = sys.argv[1], sys.argv[2]

CASES = {
    "token_top2_dropless": dict(num_experts=4, top_k=2),
    "token_top1_capacity_bpr": dict(num_experts=4, top_k=1, capacity_factor=1.0, bpr=True),
    "token_top2_cosine_capacity": dict(num_experts=8, top_k=2, router="cosine", capacity_factor=0.5),
    "image_cls_top1": dict(num_experts=4, top_k=1, routing="cls"),
    "shared_expert": dict(num_experts=4, top_k=1, shared_expert=True),
    "expert_choice": dict(num_experts=4, selection="expert_choice", capacity_factor=1.0),
    "loss_free_sigmoid_top2": dict(num_experts=4, top_k=2, balance="loss_free", score="sigmoid"),
}


def compare(ref, ep, inputs_per_rank, forward, sharded):
    """``ref`` runs every rank's input in this process; ``ep`` (sharded) only this rank's."""
    gs = [torch.randn_like(forward(ref, x).detach()) for x in inputs_per_rank]  # same seed on every rank
    ref.zero_grad()
    xs_ref = [x.clone().requires_grad_(True) for x in inputs_per_rank]
    ys_ref = [forward(ref, x) for x in xs_ref]
    sum((y * g).sum() for y, g in zip(ys_ref, gs)).backward()
    x = inputs_per_rank[rank].clone().requires_grad_(True)
    y = forward(ep, x)
    (y * gs[rank]).sum().backward()
    res = {"out": float((y - ys_ref[rank]).detach().abs().max()),
           "input_grad": float((x.grad - xs_ref[rank].grad).abs().max())}
    ref_params = dict(ref.named_parameters())
    rep, exp = 0.0, 0.0
    for name, p in ep.named_parameters():
        if p.grad is None:
            continue
        r = ref_params[name]
        if id(p) in sharded:  # this rank's experts: the whole global batch's gradient arrived here
            sh = sharded[id(p)]
            exp = max(exp, float((p.grad - r.grad[sh.start: sh.start + sh.local]).abs().max()))
        else:  # replicated: the sum over the ranks is the global gradient
            g = p.grad.clone()
            dist.all_reduce(g)
            rep = max(rep, float((g - r.grad).abs().max()))
    # the trainer's reduction: every gradient becomes the global one divided by the world size
    reduce_gradients(list(ep.parameters()), sharded, world)
    red = 0.0
    for name, p in ep.named_parameters():
        r = ref_params[name].grad
        if id(p) in sharded:
            r = r[sharded[id(p)].start: sharded[id(p)].start + sharded[id(p)].local]
        if p.grad is not None:
            red = max(red, float((p.grad - r / world).abs().max()))
    res.update(replicated_grad=rep, expert_grad=exp, reduced_grad=red, scale=float(ys_ref[rank].detach().abs().max()))
    return res


results = {}
for name, kw in CASES.items():
    torch.manual_seed(0)
    ref = build_moe(16, 32, MoEConfig(**kw, aux_weights={}, noise_std=0.0))  # noiseless: ranks compare exactly
    with torch.no_grad():  # O(1) outputs, so that 1e-5 is a tight tolerance
        for p in ref.parameters():
            p.normal_(0, 0.3)
    ep = copy.deepcopy(ref)
    shard_experts(ep, world)
    assert ep.experts.fc1_weight.shape[0] == kw["num_experts"] // world
    torch.manual_seed(1)
    xs = [torch.randn(3, 5, 16) for _ in range(world)]  # (B, T, D) per rank
    ref.train(), ep.train()
    results[name] = compare(ref, ep, xs, lambda m, x: m(x), sharded_parameters(ep))

# a whole V-MoE (every-2 placement, top-2), forward and backward
torch.manual_seed(0)
ref = create_model("vmoe_nano_patch4_32", img_size=8, patch_size=2, embed_dim=24, depth=2, num_classes=10, in_chans=1,
                   moe={"num_experts": 4, "top_k": 2, "placement": "every_1", "aux_weights": {}, "noise_std": 0.0})
ep = copy.deepcopy(ref)
shard_experts(ep, world)
torch.manual_seed(2)
imgs = [torch.rand(4, 1, 8, 8) for _ in range(world)]
results["vit"] = compare(ref.train(), ep.train(), imgs, lambda m, x: m(x), sharded_parameters(ep))

# save with 2 ranks (layout-independent), the test loads it in one process
ep.eval()
with torch.no_grad():
    logits = ep(imgs[rank])
full = gather_expert_state(ep, ep.state_dict())
if rank == 0:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in full.items()}, f"{save_dir}/ep_vit.safetensors")
torch.save({"imgs": imgs[rank], "logits": logits}, f"{save_dir}/ep_logits_rank{rank}.pt")

gathered = [None] * world
dist.all_gather_object(gathered, results)
if rank == 0:
    with open(out_path, "w") as f:
        json.dump(gathered, f, indent=2)
# destroy_process_group must free every group (and join its gloo worker threads) now: a group
# kept alive to the interpreter's teardown aborted ranks at exit ("terminate called without an
# active exception") when a worker thread dropped a finished collective's tensors while Python
# was finalising. visionmoe holds groups by weak reference only (moe.parallel._GROUPS).
groups = [weakref.ref(dist.group.WORLD)] + [ref for pair in _GROUPS.values() for ref in pair if ref is not None]
dist.destroy_process_group()
alive = sum(ref() is not None for ref in groups)
if alive:
    sys.exit(f"rank {rank}: {alive} of {len(groups)} process groups outlived destroy_process_group")
