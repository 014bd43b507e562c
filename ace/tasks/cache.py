"""On-disk cache of generated data sets, keyed by every parameter that changes their content.

A file is named ``<prefix><hash of params>.pt`` and stores ``{"params": params, "sha256": sum, **tensors}``.
Reading uses ``torch.load(weights_only=True)``; a file that cannot be read, holds other parameters, does not
match its content checksum (or has none) or fails the caller's check is reported with a warning and
regenerated, never trusted. Writing goes through a temporary file and a
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

from ace.config.schema import ConfigError

__all__ = ["cache_path", "read_cache", "write_cache"]


def cache_path(cache_dir: str, prefix: str, params: dict[str, Any]) -> Path:
    """``cache_dir/<prefix><16 hex digits of the parameters' hash>.pt``.

    Raises:
        ConfigError: naming ``data.cache_dir`` when that folder is a file, lies under one or is not writable,
            or the cache file's name is taken by a folder.
    """
    key = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{prefix}{key}.pt"
    folder = Path(cache_dir)  # refuse an unusable folder now, not after generating the data
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    problem = None
    if not folder.is_dir():
        problem = f"{folder} is a file, not a folder"
    elif not os.access(folder, os.W_OK | os.X_OK):
        problem = f"{folder} is not writable"
    elif path.is_dir():
        problem = f"{path} is a folder where the cache file should be"
    if problem:
        raise ConfigError(f"data.cache_dir: cannot cache data in {cache_dir}: {problem}; use '' for no cache")
    return path


def checksum(content: Any) -> str:
    """SHA-256 of the tensors (dtype, shape and bytes) and plain values in ``content``, keys sorted."""
    digest = hashlib.sha256()

    def feed(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{t.dtype}{tuple(obj.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            for key in sorted(obj, key=str):
                digest.update(str(key).encode())
                feed(obj[key])
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                feed(item)
        else:
            digest.update(repr(obj).encode())

    feed(content)
    return digest.hexdigest()


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
        content = {k: v for k, v in stored.items() if k not in ("params", "sha256")}
        if stored.get("sha256") != checksum(content):  # a flipped bit keeps shapes and parameters
            raise ValueError("its content does not match its checksum")
        check(content)
        return content
    except Exception as err:  # truncated, corrupt, foreign or inconsistent: all mean "regenerate"
        warnings.warn(f"regenerating data: cache {path} unusable ({err})", stacklevel=3)
        return None


def write_cache(path: Path, params: dict[str, Any], content: dict[str, Any]) -> None:
    """Store ``content`` with its parameters, atomically.

    Raises:
        ConfigError: naming ``data.cache_dir`` when the folder or the file cannot be written.
    """
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"params": params, "sha256": checksum(content), **content}, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch's writer reports some OS errors as RuntimeError
        if tmp.exists() and tmp.is_file():
            tmp.unlink()
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
        raise ConfigError(
            f"data.cache_dir: cannot write the data cache {path}: {reason}; "
            "use a writable folder, or '' for no cache"
        ) from err
