"""Expert parallelism from Python: torchrun --standalone --nproc_per_node=2 examples/expert_parallel.py"""
import torch
import torch.distributed as dist

import visionmoe
from visionmoe.moe.parallel import gather_expert_state, shard_experts

dist.init_process_group("gloo")  # CPUs; on GPUs "nccl", with model and inputs on cuda:LOCAL_RANK
torch.manual_seed(0)  # the same model on every rank
model = visionmoe.create_model("vmoe_tiny_patch4_32", num_classes=10)  # 8 experts every 2nd block
shard_experts(model, 2)  # keep this rank's 4 experts of every MoE layer
logits = model(torch.rand(8, 3, 32, 32))  # this rank's images; tokens go to their experts' ranks and back
logits.sum().backward()  # gradients flow back through the all-to-all
sd = gather_expert_state(model, model.state_dict())  # full (E, ...) expert tensors on every rank
w = "blocks.1.mlp.experts.fc1_weight"
print(f"rank {dist.get_rank()}: holds {tuple(model.get_parameter(w).shape)}, checkpoint has {tuple(sd[w].shape)}")
dist.destroy_process_group()  # leave the group before exit (an undestroyed gloo group can abort at exit)
