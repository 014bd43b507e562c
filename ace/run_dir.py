"""The layout of a run directory, in one place.

::

    RUN/config.yaml            the resolved config (ace train)
    RUN/metrics.jsonl          one JSON record per line (training, validation, test, events)
    RUN/summary.json           written when the run finishes (see :mod:`ace.records`)
    RUN/checkpoints/last.pt    the last good state (previous.pt: the one before)
    RUN/checkpoints/best_*.pt  each variant's weights at its best validation step (see :mod:`ace.selection`)
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
import yaml

from .checkpoint import CHECKPOINT_FORMAT, CheckpointError
from .config import Config, config_from_dict, config_to_dict

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no advisory lock
    fcntl = None

__all__ = [
    "METRICS",
    "SUMMARY",
    "CONFIG",
    "RunDirError",
    "OutputError",
    "checkpoints",
    "last_checkpoint",
    "best_checkpoint",
    "last_good_checkpoint",
    "claim",
    "check_writable",
    "holds_run",
    "config_changes",
    "locked",
    "load_run_config",
]

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.yaml"


def checkpoints(run: Path) -> Path:
    return Path(run) / "checkpoints"


def last_checkpoint(run: Path) -> Path:
    return checkpoints(run) / "last.pt"


def best_checkpoint(run: Path, variant: str) -> Path:
    """The weights at the best validation step of ``variant`` (``model`` or ``eq``, :mod:`ace.selection`)."""
    return checkpoints(run) / f"best_{variant}.pt"


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


#: keys that may differ between a run and its resumption (extending a run, quieter output)
RESUMABLE_CHANGES = {("train", "epochs"), ("train", "max_steps"), ("log", "progress")}


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
    return any(
        (out / name).exists() for name in ("config.yaml", "metrics.jsonl", "checkpoints", "summary.json")
    )


def config_changes(out: str | Path, cfg: Config) -> list[str]:
    """``key: old -> new`` for every key where ``cfg`` differs from the config saved in the run directory
    ``out``, apart from those a resume may change (the run length, the progress bar). ``ace sweep`` can
    tell from it that a finished run was trained with other fixed overrides."""
    saved = _saved_config(Path(out) / "config.yaml")
    new = config_to_dict(cfg)
    diffs = [
        f"{section}.{key}: {saved[section].get(key)!r} -> {value!r}"
        for section, values in new.items()
        if isinstance(values, dict) and isinstance(saved.get(section), dict)
        for key, value in values.items()
        if saved[section].get(key) != value and (section, key) not in RESUMABLE_CHANGES
    ]
    diffs += [
        f"{k}: {saved.get(k)!r} -> {v!r}"
        for k, v in new.items()
        if not isinstance(v, dict) and saved.get(k) != v
    ]
    return diffs


@contextlib.contextmanager
def locked(out: Path, held: bool) -> Iterator[None]:
    """Hold ``out/.lock`` (an advisory ``flock``, freed by the kernel even after SIGKILL) for the whole run,
    so that two ``ace train`` processes never write one directory; ``held``: whether ``out`` held a run when
    it was checked, before the lock was taken."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
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
    candidates = [
        p for p in (out / "checkpoints" / "last.pt", out / "checkpoints" / "previous.pt") if p.exists()
    ]
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


def load_run_config(out: str | Path) -> Config:
    """The resolved config saved in a run directory."""
    path = Path(out) / "config.yaml"
    if not path.exists():
        raise RunDirError(f"{out} is not a run directory (no config.yaml)")
    return config_from_dict(_saved_config(path))


def _saved_config(path: Path) -> dict:
    """The plain dict of a run's ``config.yaml``; a damaged file is a :class:`RunDirError` naming it."""
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise RunDirError(f"cannot read the config of the run {path}: {str(err).splitlines()[0]}") from err
    if not isinstance(saved, dict):
        raise RunDirError(f"{path} is not a config (a mapping of sections)")
    return saved
