"""Ship a trained model: ONNX export (dense, dense extracted from MoE experts, MoE with its
routing) checked in onnxruntime, and top-k prediction on image files with the experts used.

MoE layers export the routed computation by default (``experts="sparse"``,
:meth:`visionmoe.moe.MoE._forward_static`): each expert gathers the tokens routed to it and
kept by the eval capacity (``eval_capacity_factor``, with BPR), runs on them and adds its
weighted output back (ONNX ``NonZero`` / ``Gather`` / ``ScatterND``, dynamic shapes), so the
file does the expert FLOPs of dispatch and gives PyTorch's eval outputs. ``experts="dense"``
is the fallback with static shapes: every expert on every token, mixed by a combine matrix
that is zero off the top-k: dropless, E/K times the expert FLOPs. A model whose routers need a
cluster or task id (MoCE) is exported as the dense model its experts for one id form (``key=``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._utils import file_mode, temp_beside
from .moe.layer import moe_layers

__all__ = ["EXPERTS", "static_moe", "dropless", "export_onnx", "check_onnx", "predict_images", "top_experts"]


@contextlib.contextmanager
def _setting(objs: list, attr: str, value) -> Iterator[None]:
    """Set ``attr`` to ``value`` on every object for the duration of the block."""
    old = [getattr(o, attr) for o in objs]
    for o in objs:
        setattr(o, attr, value)
    try:
        yield
    finally:
        for o, v in zip(objs, old):
            setattr(o, attr, v)


EXPERTS = ("sparse", "dense")


def static_moe(model: nn.Module, experts: str = "dense") -> contextlib.AbstractContextManager:
    """Switch every MoE layer of ``model`` to an export path (``with`` block): ``"sparse"``
    (the routed computation, the eval capacity kept) or ``"dense"`` (every expert on every
    token, static shapes, dropless)."""
    if experts not in EXPERTS:
        raise ValueError(f"experts must be one of {EXPERTS}, got {experts!r}")
    return _setting([m for _, m in moe_layers(model)], "static", experts)


def dropless(model: nn.Module) -> contextlib.AbstractContextManager:
    """Evaluate without a capacity limit (``eval_capacity_factor=None``) in every MoE layer."""
    disp = [m.dispatcher for _, m in moe_layers(model) if hasattr(m.dispatcher, "eval_capacity_factor")]
    return _setting(disp, "eval_capacity_factor", None)


def _input_shape(model: nn.Module, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    if input_shape is not None:
        return tuple(input_shape)
    pe = getattr(model, "patch_embed", None)
    if pe is None or getattr(pe, "img_size", None) is None:
        raise ValueError("cannot tell the input size of this model; pass input_shape=(C, H, W)")
    chans = pe.proj.in_channels
    return (chans, *pe.img_size)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    input_shape: Sequence[int] | None = None,
    key: int | None = None,
    check: bool = True,
    atol: float = 1e-4,
    dynamo: bool = True,
    opset: int | None = None,
    metadata: dict[str, str] | None = None,
    experts: str = "sparse",
) -> dict[str, Any]:
    """Write ``model`` as ONNX (input ``images (B, C, H, W)``, output ``logits``, dynamic
    batch) and, with ``check``, run it in onnxruntime on random images and compare with
    PyTorch's eval (with its eval capacity for ``experts="sparse"``, dropless for
    ``"dense"``); raises ``ValueError`` beyond ``atol``.

    Args:
        key: for models routed by cluster / task id (MoCE): export the dense ViT formed by
            the experts this id routes to (:meth:`VisionTransformer.extract_dense`).
        experts: MoE layers: ``"sparse"`` (default; only the chosen experts run on each token,
            ``eval_capacity_factor`` honoured) or ``"dense"`` (every expert on every token,
            static shapes, dropless).
        dynamo: use the ``torch.export``-based exporter (default) or the older
            TorchScript-based one (faster to run, deprecated in recent PyTorch).
        metadata: strings stored in the file's ``metadata_props`` (the CLI writes the
            preprocessing as JSON under ``visionmoe.preprocessing`` and the class names under
            ``visionmoe.classes``), read back with ``onnx.load(path).metadata_props``.

    Returns ``{"path", "kind" ("dense" | "moe" | "dense-from-experts"), "max_abs_diff",
    "input_shape", "experts"}``.
    """
    if experts not in EXPERTS:
        raise ValueError(f"experts must be one of {EXPERTS}, got {experts!r}")
    try:
        import onnx  # noqa: F401 - the exporter needs it
    except ImportError as e:
        raise ImportError("ONNX export needs the onnx packages: pip install 'visionmoe[export]' "
                          "(onnx, onnxscript, onnxruntime)") from e
    model = model.eval()
    kind = "moe" if any(True for _ in moe_layers(model)) else "dense"
    if key is not None:
        if kind != "moe" or not hasattr(model, "extract_dense"):
            raise ValueError("key= extracts a dense model from a MoE ViT routed by cluster/task id; "
                             "this model has no such MoE layers")
        model, kind = model.extract_dense(key=key).eval(), "dense-from-experts"
    keyed = [n for n, m in moe_layers(model) if getattr(m.router, "needs_key", False)]
    if keyed:
        raise ValueError(f"MoE layers {keyed} route by a cluster/task id, which an image-only ONNX model cannot "
                         "take; export the dense model of one id with key=ID (CLI: --key ID)")
    shape = _input_shape(model, input_shape)
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory; name the ONNX file to write, e.g. {path / 'model.onnx'}")
    fd, tmp = temp_beside(path, ".onnx")
    os.close(fd)
    example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    kwargs: dict[str, Any] = {"input_names": ["images"], "output_names": ["logits"], "dynamo": dynamo}
    if dynamo:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1)},)
    else:
        kwargs["dynamic_axes"] = {"images": {0: "batch"}, "logits": {0: "batch"}}
    if opset is not None:
        kwargs["opset_version"] = opset
    try:
        with torch.no_grad(), static_moe(model, experts), _capacity(model, experts):
            torch.onnx.export(model, (example,), tmp, **kwargs)
        if not Path(tmp).stat().st_size:
            raise RuntimeError(f"the ONNX exporter wrote nothing to {tmp}")
        if metadata:
            import onnx

            proto = onnx.load(tmp)
            onnx.helper.set_model_props(proto, {str(k): str(v) for k, v in metadata.items()})
            onnx.save(proto, tmp)
        os.chmod(tmp, file_mode())  # the exporter re-creates the file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    out: dict[str, Any] = {"path": str(path), "kind": kind, "input_shape": list(shape), "max_abs_diff": None,
                           "experts": experts if kind == "moe" else None}
    if check:
        out["max_abs_diff"] = check_onnx(model, path, shape, atol=atol, capacity=experts == "sparse")
    return out


def _capacity(model: nn.Module, experts: str) -> contextlib.AbstractContextManager:
    """The sparse path keeps the eval capacity; the dense one is dropless."""
    return contextlib.nullcontext() if experts == "sparse" else dropless(model)


def check_onnx(model: nn.Module, path: str | Path, input_shape: Sequence[int], *, atol: float = 1e-4,
               batch: int = 5, capacity: bool = False) -> float:
    """Largest absolute difference between onnxruntime and PyTorch's eval (dropless, or with
    its eval capacity when ``capacity``) on a batch of random images; ``ValueError`` if above
    ``atol``."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError("checking an ONNX file needs onnxruntime: pip install 'visionmoe[export]'") from e
    x = torch.rand(batch, *input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), _capacity(model, "sparse" if capacity else "dense"):
        ref = model.eval()(x).float()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    if got.shape != ref.shape:
        raise ValueError(f"ONNX output shape {tuple(got.shape)} != PyTorch {tuple(ref.shape)}")
    diff = float((got - ref).abs().max())
    if not diff <= atol:
        raise ValueError(f"ONNX and PyTorch outputs differ by {diff:.3g} > atol {atol:g} on {path}")
    return diff


def top_experts(model: nn.Module, batch: int) -> list[dict[str, list[tuple[int, float]]]]:
    """After a forward of ``batch`` images: for each image, each MoE layer's experts with the
    share of the image's first-choice assignments they took (largest first). Image-level
    routing gives one expert per layer with share 1."""
    per_image: list[dict[str, list[tuple[int, float]]]] = [{} for _ in range(batch)]
    for name, layer in moe_layers(model):
        if layer.last is None:
            continue
        first = layer.last.indices[:, 0].reshape(batch, -1)  # (B, units per image)
        for b in range(batch):
            counts = torch.bincount(first[b], minlength=layer.num_experts).float()
            share = counts / counts.sum()
            order = share.argsort(descending=True)
            per_image[b][name] = [(int(e), round(float(share[e]), 3)) for e in order if share[e] > 0]
    return per_image


@torch.no_grad()
def predict_images(
    model: nn.Module,
    images: Tensor,
    classes: Sequence[str] | None = None,
    *,
    top: int = 5,
    routing: bool = False,
) -> list[dict[str, Any]]:
    """Top-``top`` classes (name, probability) for a batch ``images (B, C, H, W)``; with
    ``routing``, the experts each image used in each MoE layer (see :func:`top_experts`)."""
    model.eval()
    logits = model(images)
    probs = logits.float().softmax(-1)
    k = min(top, probs.shape[-1])
    p, idx = probs.topk(k, dim=-1)
    names = list(classes) if classes else [str(i) for i in range(probs.shape[-1])]
    out = [{"top": [(names[int(i)], round(float(v), 4)) for v, i in zip(pv, iv)]} for pv, iv in zip(p, idx)]
    if routing:
        for rec, experts in zip(out, top_experts(model, len(images))):
            rec["experts"] = experts
    return out
