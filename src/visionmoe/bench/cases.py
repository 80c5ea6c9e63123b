"""The cases ``visionmoe bench`` times: MoE layers (visionmoe's kernels and dispatchers, the
naive loop, GShard's einsum, peer libraries), the dense MLP of equal FLOPs, the ViT-S/16
training step, expert-count scaling; activation memory by saved-tensor hooks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.layers import Mlp
from torch import Tensor, nn

from ..moe import Experts, LinearRouter, MoE, MoEConfig, PooledRouter, SortedDispatcher, build_moe
from ..moe.experts import grouped_mm_available
from ..moe.layer import moe_layers
from ..moe.reference import EinsumDispatcher, LoopDispatcher

__all__ = ["Case", "activation_bytes", "layer_case", "moe_layer", "peer_cases", "layer_cases", "vit_cases",
           "scaling_cases", "small_layer_cases", "tiny_vit", "tiny_vit_cases", "export_cases", "TINY_VIT", "sync",
           "loss_of", "param_mb"]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()

def activation_bytes(fn: Callable[[], Tensor], module: nn.Module | None = None) -> int:
    """Bytes of distinct tensor storages the autograd graph saves during ``fn()``, not
    counting the storages of ``module``'s parameters (weights are not activations)."""
    seen: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in module.parameters()} if module is not None else set()

    def pack(t: Tensor):
        try:
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())

@dataclass
class Case:
    """One thing to time: ``make()`` returns a callable doing one forward (and backward)."""

    name: str
    group: str
    make: Callable[[bool], Callable[[], Any]]
    info: dict = field(default_factory=dict)
    times: dict[str, list[float]] = field(default_factory=lambda: {"fwd": [], "fwdbwd": []})
    faults: dict[str, list[float]] = field(default_factory=lambda: {"fwd": [], "fwdbwd": []})
    memory: int | None = None
    error: str | None = None

def loss_of(out) -> Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if hasattr(out, "outputs"):
        out = out.outputs
    return out.float().pow(2).mean()

def layer_case(name: str, group: str, module: nn.Module, x: Tensor, aux: Callable[[], Tensor] | None = None,
                **info) -> Case:
    def make(backward: bool):
        xx = x.detach().clone().requires_grad_(backward)

        def step():
            with torch.set_grad_enabled(backward):
                out = module(xx)
                if backward:
                    loss = loss_of(out)
                    if aux is not None:
                        loss = loss + aux()
                    loss.backward()
                    module.zero_grad(set_to_none=True)
                    xx.grad = None
            return out

        return step

    case = Case(name, group, make, info)
    try:
        case.memory = activation_bytes(lambda: module(x.detach().clone().requires_grad_(True)), module)
    except Exception as e:  # noqa: BLE001 - a peer that fails is reported, not fatal
        case.error = f"{type(e).__name__}: {e}"
    return case

def moe_layer(dim: int, hidden: int, experts: int, k: int, dispatcher=None, impl: str = "auto", level: str = "token",
         **experts_kw):
    router = LinearRouter(dim, experts, k, aux_weights={"importance": 0.005})
    if level == "image":
        router = PooledRouter(router, pool="cls")
    return MoE(router=router, experts=Experts(experts, dim, hidden, impl=impl, **experts_kw),
               dispatcher=dispatcher or SortedDispatcher())

def peer_cases(group: str, x: Tensor, dim: int, hidden: int, experts: int, k: int) -> tuple[list[Case], dict]:
    """Cases for peer libraries; returns (cases, status by peer name)."""
    cases, status = [], {}
    # DeepSpeed (pip install --no-build-isolation deepspeed): dropless (drop_tokens=False)
    try:
        import torch.distributed as dist
        from deepspeed.moe.layer import MoE as DSMoE

        if not dist.is_initialized():  # a one-process group through a fresh file: no port to collide on
            import tempfile

            store = Path(tempfile.mkdtemp(prefix="visionmoe-bench-")) / "rendezvous"
            dist.init_process_group("gloo", init_method=f"file://{store}", world_size=1, rank=0)
        m = DSMoE(dim, Mlp(dim, hidden), num_experts=experts, k=k, drop_tokens=False)
        cases.append(layer_case(f"deepspeed-k{k}", group, m, x, capacity="none (drop_tokens=False)"))
        status["deepspeed"] = "ran (drop_tokens=False: dropless, equal FLOPs)"
    except Exception as e:  # noqa: BLE001
        status["deepspeed"] = f"unavailable: {type(e).__name__}: {str(e)[:120]}"
    # lucidrains mixture-of-experts: top-2 only; its default train capacity factor 1.25
    if k == 2:
        try:
            from mixture_of_experts import MoE as LMoE

            m = LMoE(dim, num_experts=experts, hidden_dim=hidden, activation=nn.GELU, second_policy_train="all",
                     second_policy_eval="all")
            cases.append(layer_case("mixture-of-experts-k2", group, m, x, capacity="its default 1.25"))
            status["mixture-of-experts"] = "ran (second_policy='all', its default capacity factor 1.25)"
        except Exception as e:  # noqa: BLE001
            status["mixture-of-experts"] = f"unavailable: {type(e).__name__}: {str(e)[:120]}"
    # st-moe-pytorch: top-n gating; its default train capacity factor 1.25
    try:
        from st_moe_pytorch import MoE as STMoE

        if k < 2:
            raise ValueError("st-moe-pytorch needs gating_top_n >= 2")
        m = STMoE(dim, num_experts=experts, expert_hidden_mult=hidden // dim, gating_top_n=k,
                  threshold_train=0.0, threshold_eval=0.0)
        cases.append(layer_case(f"st-moe-pytorch-k{k}", group, m, x, capacity="its default 1.25"))
        status["st-moe-pytorch"] = "ran (threshold 0: always top-n, its default capacity factor 1.25)"
    except Exception as e:  # noqa: BLE001
        status["st-moe-pytorch"] = f"unavailable: {type(e).__name__}: {str(e)[:120]}"
    # soft-moe-pytorch: Soft MoE (every token weighs into every slot, no top-k, nothing dropped);
    # E experts x s slots per image with E*s <= tokens: about the dense MLP's expert FLOPs, so in
    # the top-1 group, plus its dispatch and combine einsums over all (token, slot) pairs
    if k == 1:
        try:
            from soft_moe_pytorch import SoftMoE

            slots = x.shape[1] // experts
            if slots < 1:
                raise ValueError(f"{x.shape[1]} tokens give no slot per expert for {experts} experts")
            m = SoftMoE(dim, num_experts=experts, num_slots=slots, expert_mult=hidden // dim, is_distributed=False)
            cases.append(layer_case("soft-moe-pytorch", group, m, x, capacity=f"{slots} slots per expert"))
            status["soft-moe-pytorch"] = (f"ran (Soft MoE, {experts} x {slots} slots per image: "
                                          f"{experts * slots} of {x.shape[1]} tokens' expert FLOPs)")
        except Exception as e:  # noqa: BLE001
            status["soft-moe-pytorch"] = f"unavailable: {type(e).__name__}: {str(e)[:120]}"
    for name, mod, why in (("tutel", "tutel", "not on PyPI"), ("fastmoe", "fmoe", "needs CUDA to build"),
                           ("megablocks", "megablocks", "needs CUDA (Triton/stk kernels)")):
        try:
            __import__(mod)
            status[name] = "importable (no CPU path benchmarked)"
        except Exception:  # noqa: BLE001
            status[name] = f"not installed ({why})"
    return cases, status

def layer_cases(*, batch: int, tokens: int, dim: int, hidden: int, experts: int, ks: tuple[int, ...],
                peers: bool, label: str) -> tuple[list[Case], dict]:
    x = torch.randn(batch, tokens, dim)
    group = label
    cases = [layer_case("dense", group, Mlp(dim, hidden), x)]
    status: dict = {}
    for k in ks:
        ours = moe_layer(dim, hidden, experts, k)
        cases.append(layer_case(f"visionmoe-k{k}", group, ours, x, aux=lambda m=ours: m.last.aux_loss, k=k))
        variants = {"split": dict(impl="split"), "grouped": dict(impl="grouped")}
        if k == 1:  # the fused kernel's options: experts one after another; activation recomputed
            variants.update({"serial": dict(threads=False), "recompute": dict(recompute=True)})
        for variant, kw in variants.items():
            if variant == "grouped" and not grouped_mm_available(x.device):
                continue
            alt = moe_layer(dim, hidden, experts, k, **kw)
            cases.append(layer_case(f"visionmoe-{variant}-k{k}", group, alt, x, aux=lambda m=alt: m.last.aux_loss,
                                     k=k))
        loop = moe_layer(dim, hidden, experts, k, dispatcher=LoopDispatcher())
        cases.append(layer_case(f"naive-loop-k{k}", group, loop, x, k=k))
        ein = moe_layer(dim, hidden, experts, k, dispatcher=EinsumDispatcher(capacity_factor=1.25))
        cases.append(layer_case(f"gshard-einsum-k{k}", group, ein, x, k=k, capacity="1.25"))
        if peers:
            pc, st = peer_cases(group, x, dim, hidden, experts, k)
            cases += pc
            status.update(st)
    if 1 in ks:
        img = moe_layer(dim, hidden, experts, 1, level="image")
        cases.append(layer_case("visionmoe-image-k1", group, img, x, k=1))
        # the newer routing methods, at the cost of top-1: expert choice with capacity factor 1
        # (each token one expert on average), Soft MoE with as many slots as tokens (vmoe's
        # capacity factor 1: p = round(T / E) slots per expert), loss-free top-1
        slots = max(1, round(tokens / experts))
        for name, cfg in (("expert-choice-c1", dict(selection="expert_choice", capacity_factor=1.0)),
                          ("soft-moe-c1", dict(router="soft", slots_per_expert=slots)),
                          ("loss-free-k1", dict(balance="loss_free", aux_weights={}))):
            layer = build_moe(dim, hidden, MoEConfig(num_experts=experts, top_k=1, noise_std=0.0, **cfg))
            cases.append(layer_case(f"visionmoe-{name}", group, layer, x, aux=lambda m=layer: m.last.aux_loss, k=1))
    return cases, status

def _step_case(name: str, group: str, model: nn.Module, x: Tensor, y: Tensor, call: Callable | None = None,
               **info) -> Case:
    """A training step (``fwdbwd``: forward, cross-entropy + MoE aux loss, backward, fused
    AdamW step, as the Trainer) or an inference call (``fwd``: eval mode, no grad).
    ``call``: what runs the forward (default ``model``; e.g. its ``torch.compile`` form)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the Trainer (optim.fused)
    forward = call or model

    def make(backward: bool):
        def step():
            model.train(backward)
            with torch.set_grad_enabled(backward):
                out = forward(x)
                if backward:
                    loss = torch.nn.functional.cross_entropy(out, y) + model.moe_aux_loss()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            return out

        return step

    return Case(name, group, make, info)

def _set_threads(model: nn.Module, threads: bool | str) -> nn.Module:
    for m in model.modules():
        if isinstance(m, Experts):
            m.threads = threads
    return model

def vit_cases(*, batch: int, img_size: int, experts: int, threads: bool | str = True) -> list[Case]:
    """A dense and an MoE (every-2, top-1) ViT-S/16 training step; ``threads``: the MoE
    layers' ``Experts.threads`` (a :data:`~visionmoe.moe.experts.THREAD_MODES` value)."""
    from ..models import create_model

    x = torch.randn(batch, 3, img_size, img_size)
    y = torch.randint(0, 1000, (batch,))
    cases = []
    for name, moe in (("vit-s16-dense", None), ("vit-s16-moe-every2-k1", dict(num_experts=experts, top_k=1,
                                                                              placement="every_2"))):
        model = _set_threads(create_model("vit_small_patch16_224", img_size=img_size, moe=moe), threads)
        cases.append(_step_case(name, "vit_step", model, x, y, batch=batch, img_size=img_size))
    return cases

#: the recipes' small ViT (configs/supervised/fmnist_*.yaml, the CR-MoE CPU study): 28x28 grey
#: images, patch 4 (T = 50 with the class token), width 64, depth 6, 4 heads
TINY_VIT = {"img_size": 28, "patch_size": 4, "embed_dim": 64, "depth": 6, "num_heads": 4, "in_chans": 1,
            "num_classes": 10}

def tiny_vit(moe: dict | None = None, **kw) -> nn.Module:
    """The recipes' small ViT, dense or with ``moe`` (e.g. ``{"num_experts": 4, "top_k": 1,
    "placement": "last_2"}``), dropless as the recipes unless ``moe`` sets ``capacity_factor``
    (the ``vmoe_mini`` model's own default is V-MoE's 1.05; until 2026-12-04 the bench used it)."""
    from ..models import create_model

    moe = {"capacity_factor": None, **moe} if moe else None
    return create_model("vmoe_mini_patch4_28" if moe else "vit_mini_patch4_28", **{**TINY_VIT, **kw}, moe=moe)

def _tiny_inputs(batch: int, quick: bool) -> tuple[dict, Tensor, Tensor]:
    """The small ViT's size overrides (``quick``: 16 px, 2 blocks) and a batch of grey images
    with labels."""
    kw = dict(img_size=16, depth=2) if quick else {}
    size = kw.get("img_size", TINY_VIT["img_size"])
    return kw, torch.randn(batch, 1, size, size), torch.randint(0, 10, (batch,))

def tiny_vit_cases(*, batch: int = 128, experts: int = 4, quick: bool = False) -> list[Case]:
    """The whole small-ViT training step (``fwdbwd``) and inference (``fwd``): dense, and MoE
    in the last 2 blocks (E experts, top-1 token-level, top-2, image-level top-1), dropless
    as the recipes."""
    kw, x, y = _tiny_inputs(batch, quick)
    cases = [_step_case("tiny-vit-dense", "tiny_vit", tiny_vit(**kw), x, y, batch=batch)]
    for name, extra in ((f"tiny-vit-moe-E{experts}-k1", {}), (f"tiny-vit-moe-E{experts}-k2", {"top_k": 2}),
                        (f"tiny-vit-moe-E{experts}-image-k1", {"routing": "cls"})):
        moe = {"num_experts": experts, "top_k": 1, "placement": "last_2", **extra}
        cases.append(_step_case(name, "tiny_vit", tiny_vit(moe, **kw), x, y, batch=batch))
    return cases

def compiled_cases(*, batch: int = 128, experts: int = 4, quick: bool = False) -> list[Case]:
    """The small ViT's training step (``fwdbwd``) and inference (``fwd``), eager and under
    ``torch.compile(fullgraph=True)``: dense, and MoE in the last 2 blocks (E experts, top-1,
    dropless) traced in one graph under :func:`visionmoe.moe.compile_settings` (what the
    Trainer's ``run.compile: true`` does). Each compiled case names its eager twin
    (``info["eager"]``) for the paired compiled / eager ratio. The first call of each mode
    compiles (the bench's warm-up call, not timed)."""
    from ..moe import compile_settings

    kw, x, y = _tiny_inputs(batch, quick)
    cases = []
    for tag, moe in (("dense", None), (f"moe-E{experts}-k1", {"num_experts": experts, "top_k": 1,
                                                              "placement": "last_2"})):
        eager = f"tiny-vit-{tag}"
        cases.append(_step_case(eager, "compiled", tiny_vit(moe, **kw), x, y, batch=batch))
        model = tiny_vit(moe, **kw)
        compiled = torch.compile(model, fullgraph=True)

        def call(inp, fn=compiled):
            with compile_settings():
                return fn(inp)

        cases.append(_step_case(f"{eager}-compiled", "compiled", model, x, y, call=call, batch=batch, eager=eager))
    return cases

def small_layer_cases(*, batch: int = 128, tokens: int = 50, dim: int = 64, hidden: int = 256,
                      experts: tuple[int, ...] = (4, 16)) -> list[Case]:
    """The MoE layer at the recipes' shapes (D = 64, T = 50, B = 128) against the dense MLP:
    E experts, top-1 / top-2, token- and image-level."""
    x = torch.randn(batch, tokens, dim)
    cases = [layer_case("dense", "small", Mlp(dim, hidden), x)]
    for e in experts:
        for k, level in ((1, "token"), (2, "token"), (1, "image")):
            m = moe_layer(dim, hidden, e, k, level=level)
            name = f"visionmoe-E{e}-" + ("image-" if level == "image" else "") + f"k{k}"
            cases.append(layer_case(name, "small", m, x, aux=lambda m=m: m.last.aux_loss, E=e, k=k))
    return cases

def _ort_case(name: str, group: str, sess, x, **info) -> Case:
    def make(backward: bool):
        return lambda: sess.run(None, {sess.get_inputs()[0].name: x})

    return Case(name, group, make, info)

def export_cases(*, batches: tuple[int, ...] = (1, 32), experts: int = 4, threads: int = 1, vit_s: bool = False,
                 vit_s_batches: tuple[int, ...] = (1, 8), quick: bool = False,
                 tmp: str | Path | None = None) -> dict[str, list[Case]]:
    """onnxruntime inference of exported models, by batch size: the dense model, the MoE
    model with its routed experts (``visionmoe export``'s default; dropless and with eval
    capacity factor 1), and with every expert on every token (``--dense-experts``). The
    small ViT (MoE in the last 2 blocks, E experts, top-1) at ``batches`` and, with ``vit_s``,
    ViT-S/16 (every 2, 8 experts, top-1) at ``vit_s_batches``; ORT on ``threads`` intra-op
    threads. Returns the cases by suite name (``export_<model>_b<batch>``), each with its own
    dense model first."""
    import tempfile

    import numpy as np
    import onnxruntime as ort

    from ..export import export_onnx
    from ..models import create_model

    if tmp is None:  # the sessions hold the models in memory: the files can go when they are built
        with tempfile.TemporaryDirectory(prefix="visionmoe-bench-onnx-") as d:
            return export_cases(batches=batches, experts=experts, threads=threads, vit_s=vit_s,
                                vit_s_batches=vit_s_batches, quick=quick, tmp=d)
    tmp = Path(tmp)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    kw = dict(img_size=16, depth=2) if quick else {}
    models = [("tiny-vit", tiny_vit(**kw), tiny_vit({"num_experts": experts, "top_k": 1, "placement": "last_2"},
                                                    **kw), (1, kw.get("img_size", 28), kw.get("img_size", 28)))]
    if vit_s:
        size = 32 if quick else 224
        models.append(("vit-s16", create_model("vit_small_patch16_224", img_size=size),
                       create_model("vit_small_patch16_224", img_size=size,
                                    moe=dict(num_experts=8, top_k=1, placement="every_2")), (3, size, size)))
    out: dict[str, list[Case]] = {}
    for label, dense, moe, shape in models:
        dense, moe = dense.eval(), moe.eval()
        sessions = []
        for name, model, how, cf in (("dense", dense, "sparse", None), ("moe-sparse", moe, "sparse", None),
                                     ("moe-sparse-cf1", moe, "sparse", 1.0), ("moe-dense-experts", moe, "dense", None)):
            for _, layer in moe_layers(model):
                layer.dispatcher.eval_capacity_factor = cf
            path = tmp / f"{label}-{name}.onnx"
            export_onnx(model, path, input_shape=shape, experts=how, check=False, dynamo=True)
            sessions.append((f"{label}-{name}", ort.InferenceSession(str(path), opts,
                                                                     providers=["CPUExecutionProvider"])))
        for b in batches if label == "tiny-vit" else vit_s_batches:
            x = np.random.default_rng(b).random((b, *shape), dtype=np.float32)
            suite = f"export_{label}_b{b}"
            out[suite] = [_ort_case(name, suite, sess, x, batch=b, ort_threads=threads) for name, sess in sessions]
    return out

def param_mb(module: nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 1e6

def scaling_cases(*, batch: int, tokens: int, dim: int, hidden: int, experts_list: list[int]) -> list[Case]:
    x = torch.randn(batch, tokens, dim)
    dense = Mlp(dim, hidden)
    cases = [layer_case("dense", "scaling", dense, x, param_mb=round(param_mb(dense), 3))]
    for e in experts_list:
        m = moe_layer(dim, hidden, e, 1)
        cases.append(layer_case(f"visionmoe-E{e}-k1", "scaling", m, x, aux=lambda m=m: m.last.aux_loss, E=e, k=1,
                                 param_mb=round(param_mb(m), 3)))
    return cases
