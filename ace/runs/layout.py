"""The layout of a run directory, in one place.

::

    RUN/config.yaml            the resolved config (ace train)
    RUN/metrics.jsonl          one JSON record per line (training, validation, test, events)
    RUN/summary.json           written when the run finishes (see :mod:`ace.train.summary`)
    RUN/checkpoints/last.pt    the last good state (previous.pt: the one before)
    RUN/checkpoints/best_*.pt  each variant's weights at its best validation step (:mod:`ace.train.selection`)
    RUN/tensorboard/           optional mirror of the records
    RUN/.lock                  held while a process trains in RUN
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from ace.runs.checkpoint import CHECKPOINT_FORMAT, CheckpointError

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no advisory lock
    fcntl = None

__all__ = [
    "METRICS",
    "SUMMARY",
    "CONFIG",
    "REPORT",
    "CHECKPOINTS",
    "TENSORBOARD",
    "LOCK",
    "LAST",
    "PREVIOUS",
    "best_name",
    "reset",
    "write_config",
    "remove_unstarted",
    "RunDirError",
    "OutputError",
    "checkpoints",
    "last_checkpoint",
    "best_checkpoint",
    "last_good_checkpoint",
    "claim",
    "check_writable",
    "holds_run",
    "locked",
]

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.yaml"
REPORT = "report.md"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
LOCK = ".lock"
LAST, PREVIOUS = "last.pt", "previous.pt"


def checkpoints(run: Path) -> Path:
    return Path(run) / CHECKPOINTS


def last_checkpoint(run: Path) -> Path:
    return checkpoints(run) / LAST


def best_checkpoint(run: Path, variant: str) -> Path:
    """``variant``'s weights (``model`` or ``eq``) at its best validation step, :mod:`ace.train.selection`."""
    return checkpoints(run) / best_name(variant)


def best_name(variant: str) -> str:
    return f"best_{variant}.pt"


def claim(folder: Path, overwrite: bool) -> None:
    """Refuse a folder that holds a run (records, checkpoints, summary), or clear it when ``overwrite``."""
    metrics = folder / METRICS
    held = [
        p
        for p in (metrics, folder / SUMMARY, *checkpoints(folder).glob("*.pt"))
        if p.exists() and (p != metrics or p.stat().st_size > 0)
    ]
    if held and not overwrite:
        raise ValueError(
            f"{folder} already holds a run ({', '.join(p.name for p in held)}); pass resume=True to continue "
            "it or overwrite=True to start again"
        )
    for path in held:
        path.unlink()


class RunDirError(RuntimeError):
    """A run directory that would be overwritten, or cannot be resumed."""


class OutputError(RunDirError):
    """An ``--out`` that cannot be a run directory: a file, under a file, or not writable."""


def check_writable(out: Path, what: str = "run directory") -> None:
    """Refuse a folder ``out`` that is a file, lies under a file, or cannot be written (before any work)."""
    folder = out
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        where = "is a file" if folder == out else f"lies under {folder}, which is a file"
        raise OutputError(f"cannot use {out} as the {what}: it {where}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write the {what} {out}: {folder} is not writable")


def holds_run(out: Path) -> bool:
    return any((out / name).exists() for name in (CONFIG, METRICS, CHECKPOINTS, SUMMARY))


@contextlib.contextmanager
def locked(out: Path, held: bool) -> Iterator[None]:
    """Hold ``out/.lock`` (an advisory ``flock``, freed by the kernel even after SIGKILL) for the whole run,
    so that two ``ace train`` processes never write one directory; ``held``: whether ``out`` held a run when
    it was checked, before the lock was taken."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise OutputError(f"cannot write the run directory {out}: {err.strerror or err}") from err
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise RunDirError(
                    f"{out} is in use by another ace process; wait for it to end, or use another --out"
                ) from None
        if holds_run(out) != held:  # another process wrote it since it was checked
            raise RunDirError(f"{out} was changed by another process while this run was being prepared")
        yield
    finally:
        os.close(fd)


def last_good_checkpoint(out: Path) -> Path | None:
    """``last.pt``, or ``previous.pt`` when the last one is unreadable or foreign; None if neither exists."""
    candidates = [p for p in (last_checkpoint(out), checkpoints(out) / PREVIOUS) if p.exists()]
    for path in candidates:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file falls back to the previous one
            warnings.warn(f"skipping unreadable checkpoint {path}: {err}", stacklevel=2)
            continue
        if not (isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT):  # before run() writes
            warnings.warn(
                f"skipping {path}: not an ace checkpoint (format {CHECKPOINT_FORMAT})", stacklevel=2
            )
            continue
        return path
    if candidates:
        raise CheckpointError(f"no readable checkpoint in {out / 'checkpoints'}")
    return None


def reset(out: Path) -> None:
    """Delete one run's files from ``out`` (``--overwrite``): its config, records, summary, report, plots
    and checkpoints; anything else in the folder stays."""
    for name in (METRICS, SUMMARY, CONFIG, REPORT):
        (out / name).unlink(missing_ok=True)
    for path in out.glob("*.png"):  # plots of `ace report`
        path.unlink()
    for path in checkpoints(out).glob("*"):
        path.unlink()


def write_config(out: Path, text: str) -> None:
    """Write ``config.yaml`` atomically (a torn one would block ``--resume``), making ``out`` if needed."""
    tmp = out / f"{CONFIG}.tmp"
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / CONFIG)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write the run directory {out}: {err.strerror or err}") from err


def remove_unstarted(out: Path, created: list[Path]) -> None:
    """Undo a run that stopped before its first step: its config, records and lock, and the folders it
    made (``created``, innermost first), each kept if anything else is in it."""
    for name in (CONFIG, METRICS, LOCK):
        (out / name).unlink(missing_ok=True)
    for folder in [checkpoints(out), *created]:
        with contextlib.suppress(OSError):
            folder.rmdir()
