"""Small helpers shared across the package (imports nothing from it)."""

from __future__ import annotations

import difflib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

__all__ = ["did_you_mean", "atomic_write_bytes", "mean_std"]


def mean_std(values: Iterable[float]) -> dict[str, float]:
    """``{"mean", "std", "n"}`` of a sample (std: the unbiased sample standard deviation, 0 for one value)."""
    import statistics

    vals = list(values)
    return {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def fmt_mean_std(d: dict[str, float], digits: int = 4) -> str:
    """``"0.1234 ± 0.0056"`` for a :func:`mean_std` dict; just ``"0.1234"`` for one value
    (a one-seed table prints no ``± 0``)."""
    if d.get("n") == 1:
        return f"{d['mean']:.{digits}f}"
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"


def save_results(out: str | Path, res: dict, aggregate) -> None:
    """``aggregate(res)`` (fills its summary), then write ``out/results.json`` atomically."""
    import json

    aggregate(res)
    atomic_write_bytes(Path(out) / "results.json", json.dumps(res, indent=2).encode())


def short_repr(value) -> str:
    """A bounded repr for error messages (a huge or self-referencing value stays one line)."""
    import reprlib

    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlist, r.maxdict, r.maxlevel = 60, 60, 6, 6, 3
    return r.repr(value)


def finished_runs(out: str | Path, config: dict, resume: bool, *,
                  may_change: tuple[str, ...] = ("seeds",)) -> list[dict]:
    """The runs an earlier call of a multi-run study already finished in ``out`` (its
    ``results.json``), to be skipped by a ``resume=True`` call; ``[]`` when not resuming or
    nothing was saved. A study whose settings differ from the saved ones (outside
    ``may_change``, e.g. more seeds) is refused naming the keys: its finished runs would not
    be comparable."""
    import json

    path = Path(out) / "results.json"
    if not resume or not path.exists():
        return []
    try:
        old = json.loads(path.read_text())
        saved, runs = old["config"], old["runs"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot resume from {path}: it is not a study's results file ({type(e).__name__}); "
                         "run without --resume or into another --out") from None
    now = json.loads(json.dumps(config))
    changed = sorted(k for k in set(now) | set(saved) if k not in may_change and now.get(k) != saved.get(k))
    if changed:
        diff = ", ".join(f"{k}: {short_repr(saved.get(k))} -> {short_repr(now.get(k))}" for k in changed[:4])
        raise ValueError(f"cannot resume {out}: its runs were made with other settings ({diff}); run with the "
                         "saved settings, or without --resume into another --out")
    return list(runs)


def finish_study(out: str | Path, res: dict, t0: float, aggregate, report, console) -> dict:
    """The end of a multi-run study: total seconds, ``results.json`` (via :func:`save_results`),
    ``report(out, res)`` and a line naming the report; returns ``res``."""
    import time

    res["seconds"] = time.perf_counter() - t0
    save_results(out, res, aggregate)
    report(Path(out), res)
    console.print(f"report: {Path(out) / 'report.md'} ({res['seconds'] / 60:.1f} min)")
    return res


def study_progress(title: str, unit: str, progress: bool):
    """``(console, Progress)`` for a multi-run study: a bar counting ``unit`` with elapsed time
    and a ``stage`` field; both silent when ``progress`` is False."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(quiet=not progress)
    bar = Progress(TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                   TimeElapsedColumn(), TextColumn("{task.fields[stage]}"), console=console, disable=not progress)
    return console, bar


def temp_beside(path: Path, suffix: str = ".tmp") -> tuple[int, str]:
    """``(fd, name)`` of a new temporary file in ``path``'s folder (for an atomic rename onto
    ``path``), with the permissions a plain ``open`` would give under the process umask
    (``mkstemp`` alone makes every file 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.fchmod(fd, file_mode())
    return fd, tmp


def file_mode() -> int:
    """The permissions a new file gets under the process umask (0o644 under the usual 022);
    writers that replace the temporary file (safetensors, the ONNX exporter) set it again."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temporary file in the same folder, fsync, rename."""
    path = Path(path)
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def did_you_mean(name: str, choices: Iterable[str], *, n: int = 1, cutoff: float = 0.6) -> str:
    """``" Did you mean 'x'?"`` (or ``'x', 'y'`` for n > 1) for the closest choices, or ``""``."""
    close = difflib.get_close_matches(str(name), sorted(map(str, choices)), n=n, cutoff=cutoff)
    return f" Did you mean {', '.join(map(repr, close))}?" if close else ""
