"""On-disk cache of generated data sets, keyed by every parameter that changes their content.

A file is named ``<prefix><hash of params>.pt`` and stores ``{"params": params, **tensors}``. Reading uses
``torch.load(weights_only=True)``; a file that cannot be read, holds other parameters or fails the caller's
check is reported with a warning and regenerated, never trusted. Writing goes through a temporary file and a
rename, so an interrupted write never leaves a truncated cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["cache_path", "read_cache", "write_cache"]


def cache_path(cache_dir: str, prefix: str, params: dict[str, Any]) -> Path:
    """``cache_dir/<prefix><16 hex digits of the parameters' hash>.pt``."""
    key = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{prefix}{key}.pt"


def read_cache(path: Path, params: dict[str, Any], check: Callable[[dict[str, Any]], None]) -> dict | None:
    """The stored tensors, or None (with a warning when the file exists but is unusable).

    ``check`` raises (any exception) when the stored content does not fit ``params``.
    """
    if not path.exists():
        return None
    try:
        stored = torch.load(path, weights_only=True)
        if not isinstance(stored, dict) or stored.get("params") != params:
            raise ValueError("it holds other parameters")
        content = {k: v for k, v in stored.items() if k != "params"}
        check(content)
        return content
    except Exception as err:  # truncated, corrupt, foreign or inconsistent: all mean "regenerate"
        warnings.warn(f"regenerating data: cache {path} unusable ({err})", stacklevel=3)
        return None


def write_cache(path: Path, params: dict[str, Any], content: dict[str, Any]) -> None:
    """Store ``content`` with its parameters, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save({"params": params, **content}, tmp)
    os.replace(tmp, path)
