"""What the fused CPU kernel runs on: per-thread scratch buffers, the serial expert loop, and
the plan for the compiled loop (:mod:`..native`) that deals the experts over the intra-op threads."""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

from .. import native

__all__ = ["Scratch", "SCRATCH", "clear_scratch", "THREAD_MODES", "MIN_THREADED_WORK", "check_mode", "run_serial",
           "offsets", "deal", "native_plan"]


class Scratch:
    """Per-thread buffers for the fused kernel's transient tensors (the gathered rows, the
    sorted gradients, per-expert temporaries), reused from call to call.

    A fresh multi-megabyte tensor costs a page fault per 4 KiB the first time it is written
    (the allocator hands large blocks back to the OS): on the 2-core CPU a fresh
    ``(4160, 384)`` ``index_select`` took ~2.4 ms inside a training step against ~0.3 ms
    into a reused buffer. Only tensors that live inside one forward or one backward call go
    here; saved and returned tensors are always fresh. Buffers are keyed by thread (two
    Python threads training at once each get their own), only grow, and are freed by
    :func:`clear_scratch`.
    """

    def __init__(self) -> None:
        self.bufs: dict[tuple, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        n = math.prod(shape)
        key = (threading.get_ident(), name, like.device, like.dtype)
        buf = self.bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = self.bufs[key] = like.new_empty(n)
        return buf[:n].view(shape)


SCRATCH = Scratch()


def clear_scratch() -> None:
    """Free the reusable buffers of the fused expert kernel, of every thread (they are
    re-made, as large as needed, on the next call)."""
    SCRATCH.bufs.clear()


#: ``Experts(threads=...)``: the compiled loop when it is built and :func:`.native.mode` allows it
#: (else serial); the compiled loop (an error when it is not built); serial. The Python thread
#: pool that ran small experts was removed: it never beat the serial loop at the shapes users run
#: (1.1-1.5x slower at the recipes' D = 64 layer, a tie at D = 384; docs/performance.md, "Keep
#: only what wins"); ``"python"`` is refused with that reason.
THREAD_MODES = (True, "native", False)

#: below this many multiply-adds per matmul layer (N * H * D) the experts run one after
#: another: handing work to a thread costs tens of microseconds
MIN_THREADED_WORK = 2**22


def check_mode(threads) -> None:
    """Refuse a ``threads`` value outside :data:`THREAD_MODES`, naming the fix."""
    if threads == "python":
        raise ValueError("Experts threads='python' (the Python thread pool) was removed: it did not beat the "
                         "serial loop at any measured shape; use threads=True (the compiled loop where it wins, "
                         "else serial) or False")
    if threads not in THREAD_MODES:
        raise ValueError(f"Experts threads must be one of {THREAD_MODES}, got {threads!r}")


def run_serial(counts: list[int], fn) -> None:
    """``fn(e, start, end)`` for every expert ``e`` (rows ``start:end``), one after another on
    this thread, every op using torch's intra-op threads."""
    starts = offsets(counts)
    for e in range(len(counts)):
        fn(e, starts[e], starts[e + 1])


def offsets(counts: list[int]) -> list[int]:
    """``[0, c0, c0 + c1, ...]``: expert e owns sorted rows ``offsets[e]:offsets[e + 1]``."""
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    return starts


def deal(counts: list[int], threads: int) -> list[list[int]]:
    """The experts dealt to ``threads`` groups: largest first, onto the least loaded group."""
    groups: list[list[int]] = [[] for _ in range(threads)]
    load = [0] * threads
    for e in sorted(range(len(counts)), key=lambda e: -counts[e]):
        i = load.index(min(load))
        groups[i].append(e)
        load[i] += counts[e]
    return groups


def native_plan(counts: list[int], threaded: bool | str, gelu: str | None):
    """``(module, starts, order, bounds)`` when the compiled expert loop (:mod:`.native`)
    runs these experts (``counts``: rows per expert): ``threaded`` is ``"native"``, or True
    and :func:`.native.mode` allows it (``auto``, the default: the experts with rows average
    at least :data:`.native.MIN_ROWS` rows; ``1``: always); GELU, at least 2 threads and 2
    experts with rows; and it is built. Else None (the serial loop). ``"native"`` without the
    build is an error."""
    nt = torch.get_num_threads()
    active = sum(c > 0 for c in counts)
    if threaded is False or gelu is None or nt < 2 or active < 2:
        return None
    if threaded is True:
        mode = native.mode()
        if mode == "0" or (mode == "auto" and sum(counts) < native.MIN_ROWS * active):
            return None
    module = native.load()
    if module is None:
        if threaded == "native":
            raise RuntimeError(f"Experts(threads='native') needs the compiled expert loop: {native.status()}")
        return None
    order, bounds = [], [0]
    for g in deal(counts, nt):
        order += g
        bounds.append(len(order))
    return module, offsets(counts), order, bounds


