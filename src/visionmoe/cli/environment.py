"""The one place that turns the environment into options: the ``visionmoe`` program (and
``python -m visionmoe.bench``) call :func:`apply_environment` at start-up; the library takes
the same settings as explicit calls and never reads the environment itself (except
torchrun's RANK / WORLD_SIZE / LOCAL_RANK rendezvous contract, :mod:`visionmoe.train.distributed`).

=====================  =========================================================
``VISIONMOE_MALLOC``   ``tuned`` (default) / ``default``:
                       :func:`visionmoe.runtime.tune_cpu_allocator` or not
``VISIONMOE_NATIVE``   ``auto`` (default) / ``1`` / ``0``:
                       :func:`visionmoe.moe.native.set_mode`
``VISIONMOE_CACHE``    where the compiled expert loop is kept:
                       :func:`visionmoe.moe.native.set_cache_root`
=====================  =========================================================

The running interpreter's ``bin`` folder (a virtual environment's, where ``pip install
ninja`` puts ninja) is put on ``PATH`` for the native build even when the environment is
not activated.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

__all__ = ["apply_environment"]


def apply_environment(environ: Mapping[str, str] | None = None, *, allocator: bool = True) -> None:
    """Apply the settings of ``environ`` (default ``os.environ``); a mistyped value raises
    ``ValueError`` naming the variable and its settings, before anything is changed.
    ``allocator=False`` leaves the process's allocator alone (for callers that embed the CLI)."""
    from ..moe import native
    from ..runtime import allocator_setting, tune_cpu_allocator

    env = os.environ if environ is None else environ
    tune = allocator_setting(env.get("VISIONMOE_MALLOC", ""), name="VISIONMOE_MALLOC")
    mode = env.get("VISIONMOE_NATIVE", "")
    native.set_mode(mode, name="VISIONMOE_NATIVE")
    native.set_cache_root(env.get("VISIONMOE_CACHE") or None)
    if environ is None:
        here = str(Path(sys.executable).parent)
        path = os.environ.get("PATH", "")
        if here not in path.split(os.pathsep):
            os.environ["PATH"] = os.pathsep.join([here, path]) if path else here
    if allocator and tune:
        tune_cpu_allocator()
