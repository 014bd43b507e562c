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

from pathlib import Path

__all__ = ["METRICS", "SUMMARY", "CONFIG", "checkpoints", "last_checkpoint", "claim"]

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.yaml"


def checkpoints(run: Path) -> Path:
    return Path(run) / "checkpoints"


def last_checkpoint(run: Path) -> Path:
    return checkpoints(run) / "last.pt"


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
