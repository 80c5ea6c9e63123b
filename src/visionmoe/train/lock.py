"""One trainer per run folder: an exclusive lock file holding the owner's host and pid."""

from __future__ import annotations

import json
import os
import socket
import warnings
from pathlib import Path

__all__ = ["RunLock", "RunLockedError"]


class RunLockedError(ValueError):
    """Another live process trains in this run folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


class RunLock:
    """``run_dir/.lock``, created exclusively (``O_EXCL``). A lock whose process is gone (a
    killed run, on this host) is stale: it is taken over with a warning. A lock held by a live
    process, or written on another host, is refused with the owner named."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and (owner.get("host") != me["host"] or _alive(int(owner.get("pid", -1)))):
                    raise RunLockedError(
                        f"{self.path.parent} is in use by process {owner.get('pid')} on {owner.get('host')} (lock "
                        f"{self.path}); wait for it to finish, or choose another --run-dir") from None
                warnings.warn(f"taking over the stale lock {self.path} (its process {owner and owner.get('pid')} "
                              "is gone)", stacklevel=3)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise RunLockedError(f"could not take the lock {self.path}; another process keeps creating it")

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None  # unreadable or half-written: treated as stale

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
