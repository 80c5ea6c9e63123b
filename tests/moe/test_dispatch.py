"""Dispatch: capacity and priority on hand-worked examples, equivalences, invariants."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from visionmoe.moe import Experts, SortedDispatcher, compute_capacity

from .helpers import reference_moe, route_from_probs

PROBS_4x2 = [[0.6, 0.4], [0.9, 0.1], [0.3, 0.7], [0.2, 0.8]]


def test_capacity_formula():
    assert compute_capacity(4, 1, 2, 0.5) == 1  # ceil(1*4*0.5/2)
    assert compute_capacity(65 * 64, 2, 8, 1.05) == 1092  # ceil(2*4160*1.05/8) = ceil(1092.0)
    assert compute_capacity(10, 1, 8, 1.0) == 2  # ceil(1.25)
    with pytest.raises(ValueError, match="capacity_factor"):
        compute_capacity(10, 1, 8, 0.0)


def test_capacity_drops_by_position_without_bpr():
    # top-1: tokens 0,1 -> expert 0; tokens 2,3 -> expert 1; C = ceil(1*4*0.5/2) = 1
    route = route_from_probs(PROBS_4x2, k=1)
    d = SortedDispatcher(capacity_factor=0.5, bpr=False).train()
    experts = Experts(2, 3, 5)
    x = torch.randn(4, 3)
    y, info = d(x, route, experts)
    # positions win: token 0 at expert 0, token 2 at expert 1
    assert info.kept[:, 0].tolist() == [True, False, True, False]
    assert info.capacity == 1 and info.kept_counts.tolist() == [1, 1] and info.counts.tolist() == [2, 2]
    assert info.dropped_fraction.item() == pytest.approx(0.5)
    torch.testing.assert_close(y, reference_moe(x, route, experts, info.kept))
    assert torch.equal(y[1], torch.zeros(3)) and torch.equal(y[3], torch.zeros(3))


def test_capacity_drops_by_gate_with_bpr():
    # BPR order by max gate: t1 (.9), t3 (.8), t2 (.7), t0 (.6) -> t1 and t3 keep their slots
    route = route_from_probs(PROBS_4x2, k=1)
    d = SortedDispatcher(capacity_factor=0.5, bpr=True).train()
    experts = Experts(2, 3, 5)
    x = torch.randn(4, 3)
    y, info = d(x, route, experts)
    assert info.kept[:, 0].tolist() == [False, True, False, True]
    torch.testing.assert_close(y, reference_moe(x, route, experts, info.kept))


def test_top2_places_all_first_choices_before_second_choices():
    # t0 -> (e0, e1), t1 -> (e0, e1), t2 -> (e1, e0); C = ceil(2*3*0.5/2) = 2
    probs = [[0.7, 0.3], [0.6, 0.4], [0.2, 0.8]]
    route = route_from_probs(probs, k=2)
    d = SortedDispatcher(capacity_factor=0.5, bpr=False).train()
    experts = Experts(2, 3, 5)
    x = torch.randn(3, 3)
    y, info = d(x, route, experts)
    # e0: t0(1st), t1(1st) kept, t2(2nd) dropped.
    # e1: t2's 1st choice beats the earlier token t1's 2nd choice: t2(1st), t0(2nd) kept; t1(2nd) dropped.
    assert info.kept.tolist() == [[True, True], [True, False], [True, False]]
    torch.testing.assert_close(y, reference_moe(x, route, experts, info.kept))


def test_eval_capacity_factor_is_separate():
    route = route_from_probs(PROBS_4x2, k=1)
    d = SortedDispatcher(capacity_factor=0.5, eval_capacity_factor=None)
    x = torch.randn(4, 3)
    experts = Experts(2, 3, 5)
    _, info_train = d.train()(x, route, experts)
    _, info_eval = d.eval()(x, route, experts)
    assert info_train.dropped_fraction > 0 and info_eval.dropped_fraction == 0 and info_eval.capacity is None


@pytest.mark.parametrize("k", [1, 2, 3])
def test_capacity_and_dropless_identical_when_nothing_dropped(k):
    torch.manual_seed(1)
    S, E, D = 33, 5, 8
    probs = torch.randn(S, E).softmax(-1)
    route = route_from_probs(probs, k=k)
    experts = Experts(E, D, 16)
    x = torch.randn(S, D)
    y_free, info_free = SortedDispatcher()(x, route, experts)
    for bpr in (True, False):
        y_cap, info_cap = SortedDispatcher(capacity_factor=E / k, bpr=bpr).train()(x, route, experts)
        assert info_cap.dropped_fraction == 0
        torch.testing.assert_close(y_cap, y_free, rtol=0, atol=1e-6)
    torch.testing.assert_close(y_free, reference_moe(x, route, experts), rtol=1e-5, atol=1e-6)


def test_image_level_payload_matches_token_level():
    # routing whole images = routing each of their tokens to the image's experts
    B, T, D, E = 3, 4, 6, 3
    probs = torch.randn(B, E).softmax(-1)
    route_img = route_from_probs(probs, k=2)
    route_tok = route_from_probs(probs.repeat_interleave(T, 0), k=2)
    experts = Experts(E, D, 10)
    x = torch.randn(B, T, D)
    y_img, _ = SortedDispatcher()(x, route_img, experts)
    y_tok, _ = SortedDispatcher()(x.reshape(B * T, D), route_tok, experts)
    torch.testing.assert_close(y_img.reshape(B * T, D), y_tok, rtol=0, atol=1e-6)


def test_gradients_reach_router_weights_and_experts():
    S, E, D = 12, 4, 6
    logits = torch.randn(S, E, requires_grad=True)
    probs = logits.softmax(-1)
    w, i = probs.topk(2, -1)
    from visionmoe.moe import RouterOutput

    route = RouterOutput(indices=i, weights=w, probs=probs, logits=logits)
    experts = Experts(E, D, 8)
    x = torch.randn(S, D, requires_grad=True)
    y, _ = SortedDispatcher()(x, route, experts)
    y.pow(2).sum().backward()
    assert logits.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    assert experts.fc1_weight.grad.abs().sum() > 0 and experts.fc2_bias.grad.abs().sum() > 0


@settings(max_examples=40, deadline=None)
@given(
    s=st.integers(1, 50),
    e=st.integers(1, 8),
    cf=st.one_of(st.none(), st.floats(0.1, 3.0)),
    bpr=st.booleans(),
    data=st.data(),
)
def test_dispatch_invariants(s, e, cf, bpr, data):
    k = data.draw(st.integers(1, e))
    probs = torch.randn(s, e).softmax(-1)
    route = route_from_probs(probs, k=k)
    experts = Experts(e, 4, 6)
    x = torch.randn(s, 4)
    y, info = SortedDispatcher(capacity_factor=cf, bpr=bpr).train()(x, route, experts)
    assert torch.isfinite(y).all() and y.shape == x.shape
    # no assignment lost or invented
    assert int(info.counts.sum()) == s * k
    assert int(info.kept.sum()) == int(info.kept_counts.sum())
    if cf is None:
        assert bool(info.kept.all())
    else:
        cap = compute_capacity(s, k, e, cf)
        assert int(info.kept_counts.max()) <= cap
        # an expert drops only when full
        full = info.kept_counts == cap
        assert bool(((info.counts > info.kept_counts) <= full).all())
    torch.testing.assert_close(y, reference_moe(x, route, experts, info.kept), rtol=1e-4, atol=1e-5)


def _impls():
    from visionmoe.moe.experts import grouped_mm_available

    return (["split", "fused", "fused-serial", "fused-recompute"]
            + (["grouped"] if grouped_mm_available() else []))


def _experts_kwargs(impl: str) -> dict:
    """``Experts`` arguments of a kernel variant: the fused kernel with its default threads
    (the compiled loop when it is built and the experts are large, else serial), one after
    another, or recomputing the activation."""
    if impl == "fused-serial":
        return dict(impl="fused", threads=False)
    if impl == "fused-recompute":
        return dict(impl="fused", recompute=True)
    return dict(impl=impl)


@pytest.fixture
def expert_threads(monkeypatch):
    """Two intra-op threads and no size floor, so the fused kernel's expert threads run
    even on the tests' small layers."""
    import visionmoe.moe.experts as ex

    monkeypatch.setattr(ex, "MIN_THREADED_WORK", 0)
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("cf", [None, 0.7])
@pytest.mark.parametrize("variant", ["gelu", "tanh-no-bias", "empty-expert", "image"])
def test_expert_kernels_agree_with_plain_autograd(k, cf, variant, expert_threads):
    """Outputs and every gradient (input, expert parameters and the routing logits through
    the combine weights) agree across kernels, with and without capacity drops."""
    S, E, D, H = 50, 4, 16, 32
    shape = (S, 5, D) if variant == "image" else (S, D)
    torch.manual_seed(1)
    logits0, x0, r = torch.randn(S, E), torch.randn(*shape), torch.randn(*shape)
    results = {}
    for impl in _impls():
        torch.manual_seed(0)
        logits = logits0.clone().requires_grad_(True)
        probs = logits.softmax(-1)
        if variant == "empty-expert":  # expert 3 never chosen: zero-row chunks
            probs = probs * torch.tensor([1.0, 1.0, 1.0, 0.0])
            probs = probs / probs.sum(-1, keepdim=True)
        route = route_from_probs(probs, k=k)
        kw = dict(act_layer=torch.nn.GELU(approximate="tanh"), bias=False) if variant == "tanh-no-bias" else {}
        experts = Experts(E, D, H, **_experts_kwargs(impl), **kw)
        x = x0.clone().requires_grad_(True)
        y, info = SortedDispatcher(capacity_factor=cf).train()(x, route, experts)
        (y.sum() + (y * r).sum()).backward()  # y.sum(): a stride-0 gradient, which grouped_mm alone rejects
        results[impl] = (y, x.grad, logits.grad, *[p.grad for p in experts.parameters()])
    ref = results.pop("split")
    assert ref[2].abs().sum() > 0  # the routing logits do get a gradient
    for impl, got in results.items():
        for a, b in zip(ref, got):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=impl)
    with pytest.raises(ValueError, match="impl"):
        Experts(E, D, H, impl="fast")


def test_forward_combined_scatters_weighted_outputs():
    """``y[rows[n]] += w[n] * expert(x[rows[n]])`` by hand, with a repeated row (top-2) and a
    row nobody took (zero), for the fused kernel and the split path."""
    x = torch.randn(6, 8)
    rows, counts = torch.tensor([0, 2, 2, 5, 1]), [2, 0, 3]
    w = torch.tensor([0.5, 1.0, 0.25, 2.0, -1.0])
    for impl in ("fused", "split"):
        experts = Experts(3, 8, 16, impl=impl)
        torch.manual_seed(0)
        experts.reset_parameters()
        y = experts.forward_combined(x, rows, counts, w)
        ref = torch.zeros_like(x)
        for n, (row, e) in enumerate(zip(rows.tolist(), [0, 0, 2, 2, 2])):
            ref[row] += w[n] * experts.expert(x[row], e)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
        assert torch.equal(y[3], torch.zeros(8)) and torch.equal(y[4], torch.zeros(8))


@pytest.mark.parametrize("unique", [True, False])
@pytest.mark.parametrize("gate_grad", [True, False])
def test_fused_scratch_buffers_never_reach_outputs_or_saved_tensors(unique, gate_grad):
    """The fused kernel reuses per-thread scratch buffers for its transient tensors. Two
    forwards before one backward (as activation checkpointing or a two-view loss does) must
    give the outputs and gradients of two independent split-path calls: the second call
    may overwrite the scratch but nothing the first one returned or saved."""
    from visionmoe.moe.experts import clear_scratch

    torch.manual_seed(0)
    M, D, H = 12, 8, 16
    if unique:  # top-1: a permutation of all rows
        rows, counts = torch.randperm(M), [5, 0, 7]
    else:  # top-2-like: repeated rows, one row untaken
        rows, counts = torch.tensor([0, 2, 2, 5, 1, 7, 7, 3, 9, 11]), [4, 3, 3]
    ws = [torch.rand(len(rows), requires_grad=gate_grad) for _ in range(2)]
    xs = [torch.randn(M, D, requires_grad=True) for _ in range(2)]
    coef = [torch.randn(M, D) for _ in range(2)]
    fused, split = Experts(3, D, H, impl="fused"), Experts(3, D, H, impl="split")
    split.load_state_dict(fused.state_dict())
    grads = {}
    for name, ex in (("fused", fused), ("split", split)):
        clear_scratch()
        ys = [ex.forward_combined(x, rows, counts, w, unique=unique) for x, w in zip(xs, ws)]
        first = ys[0].detach().clone()
        ex.forward_combined(torch.randn(M, D), rows, counts, ws[0].detach(), unique=unique)  # scribble
        torch.testing.assert_close(ys[0], first, rtol=0, atol=0)
        loss = sum((y * c).sum() for y, c in zip(ys, coef))
        params = [p for p in ex.parameters()]
        inputs = xs + (ws if gate_grad else [])
        grads[name] = (ys, torch.autograd.grad(loss, inputs + params))
    for a, b in zip(grads["fused"][0] + list(grads["fused"][1]), grads["split"][0] + list(grads["split"][1])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_kernel_in_eval_and_no_grad():
    experts = Experts(3, 8, 16, impl="fused")
    x = torch.randn(10, 8)
    rows = torch.tensor([3, 1, 0, 2, 4, 9, 8])
    with torch.no_grad():
        y = experts.forward_gathered(x, rows, [2, 0, 5])
    ref = torch.cat([experts.expert(x[rows[:2]], 0), experts.expert(x[rows[2:]], 2)])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="dropout"):
        Experts(3, 8, 16, impl="fused", drop=0.1).forward_gathered(x, rows, [2, 0, 5])


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("cf", [None, 0.6, 1.0])
def test_reference_dispatchers_agree_with_sorted(k, cf):
    from visionmoe.moe.reference import EinsumDispatcher, LoopDispatcher

    S, E, D = 40, 4, 8
    probs = torch.randn(S, E).softmax(-1)
    route = route_from_probs(probs, k=k)
    experts = Experts(E, D, 12)
    x = torch.randn(S, D)
    y_sorted, info = SortedDispatcher(capacity_factor=cf, bpr=False).train()(x, route, experts)
    if cf is None:
        y_loop, _ = LoopDispatcher()(x, route, experts)
        torch.testing.assert_close(y_loop, y_sorted, rtol=1e-5, atol=1e-6)
        y_ein, info_ein = EinsumDispatcher(capacity_factor=E / k)(x, route, experts)
    else:
        y_ein, info_ein = EinsumDispatcher(capacity_factor=cf)(x, route, experts)
    # GShard's one-hot path drops exactly the same assignments as the sorted path without BPR
    assert torch.equal(info_ein.kept, info.kept)
    torch.testing.assert_close(y_ein, y_sorted, rtol=1e-5, atol=1e-5)


def test_fused_kernel_generic_activation_matches_split():
    S, E, D, H = 30, 3, 8, 16
    route = route_from_probs(torch.randn(S, E).softmax(-1), k=1)
    outs = []
    for impl in ("split", "fused"):
        torch.manual_seed(0)
        experts = Experts(E, D, H, impl=impl, act_layer=torch.nn.SiLU)
        x = torch.randn(S, D, requires_grad=True)
        y, _ = SortedDispatcher()(x, route, experts)
        y.pow(2).sum().backward()
        outs.append((y, x.grad, experts.fc1_weight.grad, experts.fc2_weight.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_serial_loop_runs_every_expert_once_in_order_and_the_deal_balances_the_threads():
    """The serial loop calls each expert once, in order, on its rows and on this thread; the
    compiled loop's plan deals the experts largest first onto the least loaded thread."""
    import threading

    from visionmoe.moe.kernels.threads import deal, run_serial

    counts = [5, 0, 9, 3, 7, 1]
    seen = []
    run_serial(counts, lambda e, start, end: seen.append((e, start, end, threading.get_ident())))
    starts = [0, 5, 5, 14, 17, 24]
    assert [s[:3] for s in seen] == [(e, starts[e], starts[e] + c) for e, c in enumerate(counts)]
    assert {s[3] for s in seen} == {threading.get_ident()}
    groups = deal(counts, 2)
    assert groups == [[2, 3, 5], [4, 0, 1]]  # 9 -> 0, 7 -> 1, 5 -> 1, 3 -> 0, 1 -> 0 (a tie: the first), 0 -> 1
    assert sorted(sum(counts[e] for e in g) for g in groups) == [12, 13]


def test_the_removed_python_pool_is_refused_with_the_reason_and_the_fix():
    with pytest.raises(ValueError, match="threads='python'.*removed.*threads=True"):
        Experts(4, 8, 16, threads="python")
    e = Experts(4, 8, 16, impl="fused")
    e.threads = "python"  # the attribute can be changed: checked when the kernel runs
    with pytest.raises(ValueError, match="removed"):
        e.forward_gathered(torch.randn(6, 8), torch.arange(6), [2, 2, 1, 1])
    with pytest.raises(ValueError, match="must be one of"):
        Experts(4, 8, 16, threads="omp")


def test_recompute_saves_exactly_the_activation_less():
    """With ``recompute`` the fused kernel keeps the (N, H) activation out of the saved
    tensors (N * H * 4 bytes less, counted by the bench's saved-tensor meter) and gives the
    same outputs and gradients."""
    from visionmoe.bench import activation_bytes

    torch.manual_seed(0)
    M, D, H = 30, 8, 16
    x0, rows, counts, w = torch.randn(M, D), torch.randperm(M), [10, 20], torch.rand(M)
    res, mem = {}, {}
    for recompute in (False, True):
        ex = Experts(2, D, H, impl="fused", recompute=recompute)
        torch.manual_seed(1)
        ex.reset_parameters()
        x = x0.clone().requires_grad_(True)
        mem[recompute] = activation_bytes(lambda ex=ex, x=x: ex.forward_combined(x, rows, counts, w, unique=True), ex)
        y = ex.forward_combined(x, rows, counts, w, unique=True)
        y.pow(2).sum().backward()
        res[recompute] = (y, x.grad, ex.fc1_weight.grad, ex.fc2_weight.grad, ex.fc1_bias.grad)
    assert mem[False] - mem[True] == M * H * 4
    for a, b in zip(res[False], res[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    from visionmoe.moe import MoEConfig, build_moe

    assert build_moe(D, H, MoEConfig(recompute_activation=True)).experts.recompute
    assert not build_moe(D, H, MoEConfig()).experts.recompute


@pytest.mark.parametrize("bpr", [True, False])
def test_kept_assignments_equals_the_dispatcher(bpr):
    """The tensor-only capacity of the sparse export keeps exactly what dispatch keeps:
    random routings with tied gates, top-1/2/3, several factors, min_capacity, multiple_of,
    and expert choice's ``chosen``."""
    from visionmoe.moe import kept_assignments

    g = torch.Generator().manual_seed(0)
    for trial in range(120):
        S = int(torch.randint(1, 40, (1,), generator=g))
        E = int(torch.randint(2, 7, (1,), generator=g))
        K = int(torch.randint(1, min(3, E) + 1, (1,), generator=g))
        # few distinct logits: many ties in the BPR order
        logits = torch.randint(0, 4, (S, E), generator=g).float()
        probs = logits.softmax(-1)
        route = route_from_probs(probs, k=K)
        if trial % 4 == 3:  # a router that takes only some assignments
            route.chosen = torch.rand(S, K, generator=g) < 0.7
        cf = [0.3, 0.5, 1.0, 1.3, None][trial % 5]
        mc, mult = [(1, 1), (3, 1), (1, 4)][trial % 3]
        d = SortedDispatcher(capacity_factor=cf, bpr=bpr, min_capacity=mc, capacity_multiple_of=mult).train()
        _, info = d(torch.randn(S, 3), route, Experts(E, 3, 4))
        got = kept_assignments(route, cf, bpr=bpr, min_capacity=mc, multiple_of=mult)
        assert torch.equal(got, info.kept), (trial, S, E, K, cf, mc, mult)
