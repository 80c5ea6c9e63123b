"""Process-level settings for training and timing on the CPU.

:func:`tune_cpu_allocator` keeps freed memory in glibc's heap for the next step instead of
handing it back to the kernel. PyTorch's CPU tensors come from ``posix_memalign``; glibc serves
blocks above its mmap threshold (dynamic, at most 32 MiB) with a fresh ``mmap`` and unmaps them
on free, and trims the heap's top when more than twice that threshold is free. A training step
that frees and re-allocates the same large tensors (activations, and above all the weight
gradients, which ``zero_grad(set_to_none=True)`` drops every step) then touches every 4 KiB page
of them anew: one minor page fault each, a few microseconds on a VM. A top-1 MoE layer with 64
experts of D=384, H=1536 frees ~300 MB of expert gradients per step: ~86k faults, about a third
of its step time on the project's 2-core machine (docs/performance.md). The same idea as
preloading jemalloc or tcmalloc (which ``torch.backends.xeon.run_cpu`` recommends), done with
two ``mallopt`` calls so nothing has to be installed or preloaded.

The ``visionmoe`` command applies it at start-up (``VISIONMOE_MALLOC=default`` turns it off
there, :mod:`visionmoe.cli.environment`); the library never reads the environment. From
Python, call it once before training. The cost: the process keeps its peak heap (up to
``trim_threshold`` more) instead of returning freed memory to the system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import time

__all__ = ["tune_cpu_allocator", "allocator_state", "allocator_setting", "cpu_snapshot", "others_busy_cores",
           "threads_for", "ThreadGovernor"]

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_OFF, _ON = ("default", "off", "0"), ("", "tuned", "on", "1")
_state = "default"  # what allocator_state() reports


def allocator_setting(value: str, *, name: str = "allocator setting") -> bool:
    """Whether an allocator setting asks for :func:`tune_cpu_allocator`: ``tuned`` / ``on`` /
    ``1`` / empty (the default) yes, ``default`` / ``off`` / ``0`` no; another value is refused
    naming ``name`` (e.g. the environment variable it came from) and the settings."""
    v = str(value).strip().lower()
    if v in _OFF:
        return False
    if v not in _ON:
        raise ValueError(f"{name}={value!r} is not a setting: use 'default' (glibc's own "
                         f"allocator settings) or 'tuned' (the default when unset)")
    return True


def tune_cpu_allocator(trim_threshold: int = 2**31 - 1) -> bool:
    """Serve every allocation from glibc's heap (``M_MMAP_MAX=0``) and trim the heap only when
    more than ``trim_threshold`` bytes at its top are free (``M_TRIM_THRESHOLD``), so tensors
    freed in one step are reused, already paged in, by the next.

    Returns True where it took effect (Linux with glibc), False elsewhere. Calling it again
    is harmless. Existing allocations are not moved.
    """
    global _state
    if not (0 < trim_threshold <= 2**31 - 1):
        raise ValueError(f"trim_threshold must be in 1 .. 2**31 - 1 bytes (mallopt takes an int), "
                         f"got {trim_threshold}")
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl (no mallopt) or no libc found
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) != 1:
        return False
    _state = f"glibc heap only (M_MMAP_MAX=0, M_TRIM_THRESHOLD={trim_threshold})"
    return True


def allocator_state() -> str:
    """``"default"`` or what :func:`tune_cpu_allocator` set in this process (for reports)."""
    return _state


# ---------------------------------------------------------------------------- threads under load
# PyTorch's CPU ops split their work over OpenMP threads that meet at a barrier after each op.
# When another process keeps one of the cores busy, the thread that shares its core gets a time
# slice only now and then, and every op waits for it: on the project's 2-core machine, with one
# busy process beside it, training at torch's default 2 threads ran ~10x slower than at one
# (docs/performance.md, "Threads under load"). ``run.threads: auto`` (the default) measures how
# busy the process's cores are with other work and uses only the free ones.


def cpu_snapshot() -> tuple[float, float, float] | None:
    """``(busy, own, wall)`` seconds now: CPU time spent busy on the cores this process may run on
    (``/proc/stat``, every process), this process's own CPU time (all its threads, and its
    children's: data-loader workers are the run's own load) and a monotonic clock; ``None``
    where ``/proc/stat`` cannot be read (not Linux)."""
    try:
        cpus = os.sched_getaffinity(0)
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except (OSError, AttributeError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    busy = 0
    for line in lines:
        name, *vals = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        v = [int(x) for x in vals[:8]]  # user nice system idle iowait irq softirq steal
        busy += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
    t = os.times()
    own = t.user + t.system + t.children_user + t.children_system + _live_children_seconds(tick)
    return busy / tick, own, time.monotonic()


def _live_children_seconds(tick: int) -> float:
    """CPU seconds of this process's running children (data-loader workers): the run's own work,
    not another process's (a child that exits moves into ``os.times().children_*``)."""
    me, total = os.getpid(), 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid ...
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == me:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def others_busy_cores(before: tuple[float, float, float], after: tuple[float, float, float]) -> float:
    """How many of this process's cores other processes (not this one's children, such as
    data-loader workers) kept busy on average between two :func:`cpu_snapshot` calls."""
    wall = max(after[2] - before[2], 1e-6)
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / wall)


def threads_for(others: float, cap: int, cores: int | None = None) -> int:
    """The intra-op thread count for ``others`` busy cores: the free cores of this process's
    ``cores`` (default: its CPU affinity), rounded down unless nearly free, within 1 .. ``cap``."""
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    return max(1, min(cap, int(cores - others + 0.3)))


_recent: tuple[float, float, float] | None = None  # the process's latest snapshot (see ThreadGovernor.start)


class ThreadGovernor:
    """``run.threads: auto``: torch's intra-op threads follow the cores other processes leave free.

    :meth:`start` samples the machine for ``window`` seconds and sets the thread count;
    :meth:`update` (called once per training step, cheap) re-measures over the last
    ``interval`` seconds and changes the count when the load changed. Never more than ``cap``
    threads (default: torch's count when the governor is built, i.e. its default or the
    user's ``torch.set_num_threads``). Where the load cannot be read it leaves torch alone."""

    def __init__(self, cap: int | None = None, *, interval: float = 30.0, window: float = 0.2) -> None:
        import torch

        self.cap = cap or torch.get_num_threads()
        self.interval, self.window = interval, window
        self.threads: int | None = None
        self._last: tuple[float, float, float] | None = None
        self.changes: list[tuple[float, int]] = []  # (others' busy cores, threads) at each change
        self._before = torch.get_num_threads()

    def _apply(self, before, after) -> int | None:
        import torch

        others = others_busy_cores(before, after)
        n = threads_for(others, self.cap)
        if n != self.threads:
            torch.set_num_threads(n)
            self.threads = n
            self.changes.append((round(others, 2), n))
        self._last = after
        global _recent
        _recent = after
        return n

    def start(self) -> int | None:
        """Measure (over the time since another governor of this process last measured, if that
        was under a minute ago, else by sleeping ``window`` seconds) and set the threads;
        ``None`` where the load cannot be read."""
        b = cpu_snapshot()
        if b is None:
            return None
        a = _recent if _recent is not None and self.window <= b[2] - _recent[2] <= 60 else None
        if a is None:
            a = b
            time.sleep(self.window)
            b = cpu_snapshot()
        return self._apply(a, b) if b is not None else None

    def stop(self) -> None:
        """Put back the thread count torch had when the governor was built."""
        import torch

        if self.threads is not None:
            torch.set_num_threads(self._before)

    def update(self) -> int | None:
        """Re-measure once ``interval`` seconds have passed since the last measurement."""
        if self._last is None or time.monotonic() - self._last[2] < self.interval:
            return self.threads
        now = cpu_snapshot()
        return self._apply(self._last, now) if now is not None else self.threads

    def describe(self) -> str:
        return (f"{self.threads} intra-op thread(s) of {self.cap} (run.threads=auto: the cores other processes "
                f"leave free, re-checked every {self.interval:g} s)" if self.threads else
                f"torch's default threads ({self.cap}; the machine's load cannot be read here)")
