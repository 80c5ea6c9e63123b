import torch

from visionmoe.analysis import class_expert_table, dominant_expert_share
from visionmoe.models import VisionTransformer


def test_class_expert_table_follows_keys_and_tokens():
    torch.manual_seed(0)
    moe = dict(num_experts=3, top_k=1, placement=[1], routing="cluster", num_keys=3, key_dim=3, noise_std=0.0)
    model = VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=2, num_heads=2,
                              num_classes=0, moe=moe)
    router = model.blocks[1].mlp.router
    with torch.no_grad():  # key k -> expert (k + 1) % 3
        router.embed.weight.copy_(torch.eye(3))
        router.proj.weight.copy_(10 * torch.eye(3).roll(1, dims=0))
    x = torch.rand(12, 1, 8, 8)
    y = torch.arange(12) % 3  # class = key
    table = class_expert_table(model, x, y, 3, routing_key=y, batch_size=5)[1]
    torch.testing.assert_close(table, torch.eye(3).roll(1, dims=1))
    assert dominant_expert_share(table) == 1 / 3
    # every class on one expert: full collapse
    assert dominant_expert_share(torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3]])) == 1.0


def test_token_level_table_rows_sum_to_one():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=2, num_heads=2,
                              num_classes=0, moe=dict(num_experts=4, top_k=2, placement=[0, 1]))
    y = torch.tensor([0, 1, 1, 2, 2, 2])
    tables = class_expert_table(model, torch.rand(6, 1, 8, 8), y, 4)
    assert set(tables) == {0, 1}
    for t in tables.values():
        torch.testing.assert_close(t.sum(1), torch.tensor([1.0, 1.0, 1.0, 0.0]))  # class 3 has no images


def test_expert_similarity_distinct_and_cdf_by_hand():
    from visionmoe.analysis import cdf, distinct_experts, expert_similarity

    counts = torch.tensor([[2.0, 2.0, 0.0], [4.0, 0.0, 1.0]])
    s = expert_similarity(counts)
    expected = torch.tensor([[1.0, 0.5, 2 / 7], [0.5, 1.0, 0.0], [2 / 7, 0.0, 1.0]])
    torch.testing.assert_close(s, expected)
    assert distinct_experts(counts).tolist() == [2, 2]
    v, p = cdf(torch.tensor([3, 1, 2, 2]))
    assert v.tolist() == [1, 2, 3] and p.tolist() == [0.25, 0.75, 1.0]


def test_patches_per_expert_cdf_over_images_where_active_by_hand():
    """Sweet spot Fig. 8: per expert, the CDF of an image's patches on it, images where it is active."""
    from visionmoe.analysis import patches_per_expert

    counts = torch.tensor([[3.0, 0.0, 1.0], [1.0, 0.0, 3.0], [3.0, 0.0, 1.0], [2.0, 0.0, 2.0]])
    (v0, p0), (v1, p1), (v2, p2) = patches_per_expert(counts)
    assert v0.tolist() == [1, 2, 3] and p0.tolist() == [0.25, 0.5, 1.0]
    assert v1.numel() == 0 and p1.numel() == 0  # never used
    assert v2.tolist() == [1, 2, 3] and p2.tolist() == [0.5, 0.75, 1.0]


def test_routing_degree_and_paths_by_hand():
    from visionmoe.analysis import routing_degree, routing_paths

    assert routing_degree(8, 1, 2) == 64 and routing_degree(4, 2, 3) == 216
    top1 = {0: torch.tensor([[0, 0, 1], [1, 1, 1]]), 1: torch.tensor([[2, 2, 2], [0, 1, 0]])}
    assert routing_paths(top1) == {"mean_paths_per_image": 2.0, "distinct_image_paths": 2}


def test_collect_routing_counts_tokens_per_expert():
    from visionmoe.analysis import collect_routing

    torch.manual_seed(0)
    moe = dict(num_experts=3, top_k=1, placement=[1], routing="cluster", num_keys=3, key_dim=3, noise_std=0.0)
    model = VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=2, num_heads=2,
                              num_classes=0, moe=moe)
    router = model.blocks[1].mlp.router
    with torch.no_grad():
        router.embed.weight.copy_(torch.eye(3))
        router.proj.weight.copy_(10 * torch.eye(3))
    keys = torch.tensor([0, 2, 2, 1])
    rec = collect_routing(model, torch.rand(4, 1, 8, 8), routing_key=keys, batch_size=3)[1]
    tokens = 1 + 4  # CLS + 2x2 patches
    torch.testing.assert_close(rec["counts"], tokens * torch.nn.functional.one_hot(keys, 3).float())
    assert rec["top1"].tolist() == [[0], [2], [2], [1]]
    assert rec["kept"].tolist() == [1.0] * 4  # dropless: nothing dropped


def test_collect_routing_reports_capacity_drops():
    from visionmoe.analysis import collect_routing

    torch.manual_seed(0)
    moe = dict(num_experts=2, top_k=1, placement=[0], noise_std=0.0, capacity_factor=0.5, eval_capacity_factor=0.5)
    model = VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2,
                              num_classes=0, moe=moe)
    rec = collect_routing(model, torch.rand(6, 1, 8, 8))[0]
    # capacity C = ceil(0.5 x 30 tokens / 2 experts) = 8 per expert: at most 16 of the 30 tokens are kept
    assert float(rec["kept"].mean()) <= 16 / 30 + 1e-6
