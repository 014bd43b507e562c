"""Where training records go: ``metrics.jsonl`` (canonical), TensorBoard (optional), the console."""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

__all__ = ["MetricsLog", "read_metrics", "write_json", "format_table"]


class MetricsLog:
    """Appends one JSON object per record to ``metrics.jsonl`` and mirrors scalars to TensorBoard.

    Each line is written whole and flushed, so a killed run leaves at most one torn last line,
    which :func:`read_metrics` drops.

    Args:
        path: the ``metrics.jsonl`` file, or ``None`` to keep records in memory only.
        tensorboard_dir: a folder for TensorBoard event files, or ``None``.
    """

    def __init__(self, path: str | os.PathLike | None, tensorboard_dir: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self._file: IO[str] | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _drop_torn_tail(self.path)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn(
                    "log.tensorboard is on but tensorboard is not installed; skipping it", stacklevel=2
                )
            else:
                self._tb = SummaryWriter(str(tensorboard_dir))

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record, allow_nan=True) + "\n")
            self._file.flush()
        if self._tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)

    def truncate(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Rewrite the file with only the records for which ``keep`` is true."""
        if self._file is None:
            return
        assert self.path is not None, "a file is open only with a path"
        self._file.close()
        kept = [r for r in read_metrics(self.path) if keep(r)]
        tmp = self.path.with_name(self.path.name + ".tmp")  # a kill mid-rewrite must not lose the records
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line that a kill left without its newline, so appending starts clean."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(cut)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete records of a ``metrics.jsonl``.

    A torn last line (a kill mid-write) is dropped silently; any other line that is not a JSON object
    (damaged from outside) is skipped with a warning naming its number, so the valid records still read.
    """
    records = []
    lines = Path(path).read_bytes().split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif number < len(lines):  # the last line, without its newline, is the one a kill may tear
            warnings.warn(f"{path}: skipping line {number}: not a JSON record", stacklevel=2)
    return records


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temporary file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return "-" if value is None else str(value)


def format_table(header: list[str], rows: Iterable[list[Any]]) -> str:
    """A markdown table with aligned columns."""
    cells = [header] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def is_terminal() -> bool:
    return sys.stderr.isatty()
