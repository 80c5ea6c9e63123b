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
import sys

__all__ = ["tune_cpu_allocator", "allocator_state", "allocator_setting"]

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
