import torch

from visionmoe.analysis import gradient_magnitude_scores
from visionmoe.models import create_model
from visionmoe.moe import resolve_placement


def test_scores_equal_hand_computed_gradient_norms():
    torch.manual_seed(0)
    m = create_model("vit_nano_patch4_32", num_classes=3, depth=3)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])

    def loss_fn(model, batch):
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

    scores = gradient_magnitude_scores(m, [(x, y)], loss_fn)
    assert len(scores) == 3
    m.zero_grad()
    loss_fn(m, (x, y)).backward()
    for i, s in enumerate(scores):
        g = torch.cat([p.grad.flatten() for p in m.blocks[i].mlp.parameters()])
        assert abs(s - g.norm().item()) < 1e-4 * max(1.0, s)
    chosen = resolve_placement("by_gradient_magnitude", 3, scores=scores, num_layers=1)
    assert chosen == [max(range(3), key=lambda i: scores[i])]
