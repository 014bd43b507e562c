"""Checkpoint files: atomic writes that keep the previous file, safe reads, and the RNG states to save.

A checkpoint is written to ``NAME.tmp``, flushed and fsynced, then the current file (if any) is renamed to
``previous.pt`` and the new one renamed into place, and the folder is fsynced: a kill at any moment leaves at
least one complete file. Reads use ``torch.load(weights_only=True)``, so no code runs from a checkpoint.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "save_atomic", "load", "rng_state", "set_rng_state"]

CHECKPOINT_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit this trainer."""


def save_atomic(obj: Any, path: str | os.PathLike, previous: str | None = "previous.pt") -> Path:
    """``torch.save(obj)`` to ``path`` atomically, keeping the file it replaces as ``previous`` (in the same
    folder; ``None``: the old file is simply replaced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as err:  # a full disk (torch's writer raises RuntimeError): keep the rest
        tmp.unlink(missing_ok=True)
        kept = f"{path} is unchanged" if path.exists() else "no earlier checkpoint exists"
        raise CheckpointError(f"cannot write checkpoint {path}: {err}; {kept}") from err
    if previous is not None and path.exists():
        os.replace(path, path.with_name(previous))
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def load(path: str | os.PathLike, device: torch.device | str = "cpu") -> Any:
    """Read a checkpoint (tensors and plain containers only)."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # truncated, foreign or hostile files all end here
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err


def _fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state(legacy=True)  # the default: numpy's stubs default to legacy=False
    assert isinstance(np_state, tuple), "the legacy global generator's state is a tuple"
    state = {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    random.setstate(_as_tuples(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(obj: Any) -> Any:
    """random.setstate wants tuples; a checkpoint round trip may give lists."""
    return tuple(_as_tuples(o) for o in obj) if isinstance(obj, (list, tuple)) else obj
