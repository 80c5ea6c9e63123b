"""Test helpers: fixed routing decisions and an independent reference MoE."""

import torch

from visionmoe.moe import RouterOutput


def route_from_probs(probs, k, renormalize=False):
    probs = torch.as_tensor(probs, dtype=torch.float32)
    w, i = probs.topk(k, dim=-1)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return RouterOutput(indices=i, weights=w, probs=probs, logits=probs.log(), aux={}, aux_loss=torch.zeros(()))


def reference_moe(x, route, experts, kept=None):
    """Loop over units and their choices: y[s] = sum_k kept * w[s,k] * expert_{i[s,k]}(x[s])."""
    y = torch.zeros_like(x)
    S, K = route.indices.shape
    for s in range(S):
        for k in range(K):
            if kept is not None and not kept[s, k]:
                continue
            e = int(route.indices[s, k])
            y[s] = y[s] + route.weights[s, k] * experts.expert(x[s], e)
    return y


def explain_training(model, x):
    """``torch._dynamo.explain`` of a training forward: the model's output sum plus its MoE aux loss."""
    import torch._dynamo as dynamo

    from visionmoe.moe import collect_aux_loss

    dynamo.reset()
    return dynamo.explain(lambda x: model(x).sum() + collect_aux_loss(model))(x)
