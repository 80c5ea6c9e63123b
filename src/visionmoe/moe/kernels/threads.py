"""What the fused CPU kernel runs on: per-thread scratch buffers, the experts dealt over the
intra-op threads (a Python pool), and the plan for the compiled loop (:mod:`..native`)."""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import wait

import torch
from torch import Tensor

from .. import native

__all__ = ["Scratch", "SCRATCH", "clear_scratch", "THREAD_MODES", "MIN_THREADED_WORK", "ExpertThreads", "THREADS",
           "offsets", "deal", "native_plan"]


class Scratch:
    """Per-thread buffers for the fused kernel's transient tensors (the gathered rows, the
    sorted gradients, per-expert temporaries), reused from call to call.

    A fresh multi-megabyte tensor costs a page fault per 4 KiB the first time it is written
    (the allocator hands large blocks back to the OS): on the 2-core CPU a fresh
    ``(4160, 384)`` ``index_select`` took ~2.4 ms inside a training step against ~0.3 ms
    into a reused buffer. Only tensors that live inside one forward or one backward call go
    here; saved and returned tensors are always fresh. Buffers are keyed by thread (the
    expert threads each have their own), only grow, and are freed by :func:`clear_scratch`.
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


#: ``Experts(threads=...)``: the compiled loop for experts of >= native.MIN_ROWS rows when
#: it is built, else the Python pool (native.set_mode); the compiled loop; the Python pool; serial
THREAD_MODES = (True, "native", "python", False)

#: below this many multiply-adds per matmul layer (N * H * D) the experts run one after
#: another: handing work to a thread costs tens of microseconds
MIN_THREADED_WORK = 2**22


class ExpertThreads:
    """Run the experts of one layer in parallel over the intra-op threads.

    With every op split over the 2 cores, a top-1 layer of 8 experts x 520 rows ran its
    matmuls ~15% slower than one dense matmul of 4,160 rows (one thread: ~2%): small
    matmuls parallelise worse. So the experts are dealt to ``torch.get_num_threads()``
    threads (the calling one and a pool of workers), largest first onto the least loaded,
    and every op runs single-threaded (``torch.set_num_threads(1)`` in each of them for the
    duration; the caller's count is restored afterwards, also on error). Each expert writes
    only its own slices, so the result does not depend on the thread count. Torch ops
    release the GIL, so the threads run truly in parallel.
    """

    def __init__(self) -> None:
        self.pool = None
        self.key: tuple[int, int] | None = None  # (process id, workers): rebuilt after a fork
        self.lock = threading.Lock()

    def _pool(self, workers: int):
        from concurrent.futures import ThreadPoolExecutor

        key = (os.getpid(), workers)
        with self.lock:
            if self.key != key:
                if self.pool is not None and self.key[0] == key[0]:
                    self.pool.shutdown(wait=False)
                self.pool = ThreadPoolExecutor(workers, thread_name_prefix="visionmoe-experts")
                self.key = key
            return self.pool

    def run(self, counts: list[int], fn, threaded: bool) -> None:
        """``fn(e, start, end)`` for every expert ``e`` (rows ``start:end``)."""
        starts = offsets(counts)
        nt = torch.get_num_threads()
        if not threaded or nt < 2 or sum(c > 0 for c in counts) < 2:
            for e in range(len(counts)):
                fn(e, starts[e], starts[e + 1])
            return
        groups = deal(counts, nt)
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

        def run_group(group: list[int]) -> None:  # the caller's thread-local modes, in every thread
            torch.set_num_threads(1)  # here too, in the caller (restored below) and in each worker
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                for e in group:
                    fn(e, starts[e], starts[e + 1])

        pool = self._pool(nt - 1)
        futures = []
        try:
            futures = [pool.submit(run_group, g) for g in groups[1:] if g]
            run_group(groups[0])
        finally:
            wait(futures)  # never leave a worker writing into buffers after an error here
            torch.set_num_threads(nt)
        for f in futures:
            f.result()  # re-raise a worker's error


THREADS = ExpertThreads()


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
    experts with rows; and it is built. Else None (the Python thread pool or the serial
    loop). ``"native"`` without the build is an error."""
    nt = torch.get_num_threads()
    active = sum(c > 0 for c in counts)
    if threaded in (False, "python") or gelu is None or nt < 2 or active < 2:
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


