"""The optional compiled CPU expert loop (``csrc/experts_cpu.cpp``).

The fused expert kernel runs the experts of a layer in parallel over the CPU threads. In
pure Python that takes a thread pool next to PyTorch's own OpenMP threads; on a 2-core
machine the pool's worker then shares a core with libgomp's worker, which keeps spinning
for a while after the last parallel op (docs/performance.md). The compiled loop runs the
same groups of experts inside one ``at::parallel_for`` instead, so the OpenMP worker runs
the second group itself.

By default (mode ``auto``) ``threads=True`` layers use it when it is built and their experts
average at least :data:`MIN_ROWS` rows, and run the experts one after another below that or
when it is not built (docs/performance.md, "The compiled expert loop" and "Keep only what
wins": the Python thread pool that used to run here lost to the serial loop and was removed). :func:`set_mode` ``"1"``
uses it for every ``threads=True`` layer, ``"0"`` never; ``Experts(threads="native")`` for one
layer. The ``visionmoe`` program sets the mode from ``VISIONMOE_NATIVE`` at start-up
(:mod:`visionmoe.cli.environment`); the library never reads the environment itself.

It is compiled once per source, PyTorch and Python version (about 35 s with a C++
compiler and ninja on PATH; ``visionmoe build-native``, which ``make setup`` runs) into
``~/.cache/visionmoe/native/<key>/`` (:func:`set_cache_root` moves it; the program takes
``VISIONMOE_CACHE``) and loaded from there afterwards without a compiler. Nothing is
compiled implicitly. All loops give the same results.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["SOURCE", "MIN_ROWS", "SETTINGS", "cache_dir", "set_cache_root", "build", "built", "load", "mode",
           "set_mode", "status"]

SOURCE = Path(__file__).with_name("csrc") / "experts_cpu.cpp"
_NAME = "visionmoe_experts_cpu"
_LOCK = threading.Lock()
_LOADED: dict[Path, ModuleType | None] = {}

#: mode ``auto``: threads=True layers whose experts with rows average at least this many rows
#: run in the compiled loop (when built), smaller ones serially. First measured against the
#: former Python pool (crossover between 130 and 260 rows); against the serial loop the compiled
#: one lost at ~65 rows (D=384, E=64: 1.06 / 1.53 / 1.17x in three runs) and won at 400-1,600
#: (the recipes' D=64 layer: 0.92-0.99x in 11 of 12)
MIN_ROWS = 256
#: the modes :func:`set_mode` takes
SETTINGS = ("auto", "1", "0")
_MODE = "auto"
_CACHE_ROOT: Path | None = None


@functools.lru_cache(maxsize=1)
def _key() -> str:  # read once per process: load() runs on every forward of a native layer
    h = hashlib.sha256(SOURCE.read_bytes())
    for part in (torch.__version__, sys.version, sysconfig.get_platform(), sysconfig.get_config_var("EXT_SUFFIX")):
        h.update(str(part).encode())
    return h.hexdigest()[:16]


def set_cache_root(root: str | Path | None) -> None:
    """Keep builds under ``root/native/`` instead of ``~/.cache/visionmoe/native/`` (None:
    back to the default)."""
    global _CACHE_ROOT
    _CACHE_ROOT = Path(root) if root else None


def cache_dir() -> Path:
    """Where the build for this source, PyTorch and Python lives."""
    root = _CACHE_ROOT or Path.home() / ".cache" / "visionmoe"
    return root / "native" / _key()


def set_mode(value: str, *, name: str = "native mode") -> None:
    """When ``threads=True`` layers use the compiled loop: ``"auto"`` (the default: for
    experts of at least :data:`MIN_ROWS` rows when it is built), ``"1"`` (for every layer when
    built) or ``"0"`` (never: the experts run one after another). Another value is refused naming the
    settings (``name``: what the value was given as, e.g. the environment variable)."""
    global _MODE
    v = str(value).strip().lower() or "auto"
    if v not in SETTINGS:
        raise ValueError(f"{name}={value!r} is not a setting: use auto (the default: the compiled expert "
                         f"loop for experts of >= {MIN_ROWS} rows when it is built), 1 (always when built) or 0 "
                         "(never: the experts run one after another)")
    _MODE = v


def mode() -> str:
    """The current :func:`set_mode` value."""
    return _MODE


def _library(directory: Path) -> Path:
    return directory / f"{_NAME}{'.pyd' if os.name == 'nt' else '.so'}"  # what torch's JIT build writes


def _import(path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(_NAME, str(path))
    spec = importlib.util.spec_from_file_location(_NAME, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def built() -> bool:
    """Whether the library for this source, PyTorch and Python is in :func:`cache_dir`."""
    return _library(cache_dir()).is_file()


def load() -> ModuleType | None:
    """The compiled module if it is built, else None (never compiles)."""
    directory = cache_dir()
    with _LOCK:
        if directory not in _LOADED:
            lib = _library(directory)
            _LOADED[directory] = _import(lib) if lib.is_file() else None
        return _LOADED[directory]


def build(verbose: bool = False) -> Path:
    """Compile the expert loop into :func:`cache_dir` (a no-op when it is there already) and
    return the library's path. Needs a C++ compiler and ninja (``pip install ninja``); the
    build goes to a temporary folder that is renamed into place, so an interrupted build
    leaves nothing half-written behind."""
    directory = cache_dir()
    lib = _library(directory)
    if lib.is_file():
        return lib
    missing = [tool for tool in ("c++", "ninja") if _which(tool) is None]
    if missing:
        raise RuntimeError(f"building the compiled expert loop needs {' and '.join(missing)} on PATH "
                           "(Debian: apt install g++; ninja: pip install ninja, with its environment's bin folder on "
                           "PATH); without it the experts run one after another")
    # a CPU-only build: quiet torch's note that no CUDA runtime is found, printed on import
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.cpp_extension import load as cpp_load

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        cpp_load(_NAME, [str(SOURCE)], extra_cflags=["-O3"], build_directory=str(tmp), verbose=verbose,
                 is_python_module=True)
        if not (tmp / lib.name).is_file():
            raise RuntimeError(f"the build finished without writing {lib.name} in {tmp}")
        for f in tmp.iterdir():  # keep the library only
            if f.name != lib.name:
                shutil.rmtree(f) if f.is_dir() else f.unlink()
        try:
            tmp.rename(directory)
        except OSError:  # built meanwhile by another process: keep theirs
            if not lib.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with _LOCK:
        _LOADED.pop(directory, None)
    return lib


def _which(tool: str) -> str | None:
    return shutil.which(tool)


def status() -> str:
    """One line: whether the compiled expert loop is built and when ``threads=True`` uses it."""
    mode = _MODE
    lib = _library(cache_dir())
    if not lib.is_file():
        return (f"not built: experts run one after another (visionmoe build-native writes {lib}; then "
                f"threads=True layers use it for experts of >= {MIN_ROWS} rows)")
    if mode == "0":
        return (f"built, off (native mode 0): {lib}; threads=True layers run the experts one after another, "
                "Experts(threads='native') uses it")
    if mode == "1":
        return f"on (native mode 1): {lib}; every threads=True layer uses it"
    return (f"built, auto: {lib}; threads=True layers use it when their experts average >= {MIN_ROWS} rows, "
            "one after another below (native mode 1: always, 0: never; VISIONMOE_NATIVE for the program)")
