"""A grid of overrides of one config, trained one after another, and compared."""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from pathlib import Path

from ace.runs.compare import compare
from ace.runs.layout import CONFIG, SUMMARY

__all__ = ["sweep", "parse_grid"]


def _split_values(text: str) -> list[str]:
    """Split ``v1,v2`` on top-level commas (a YAML ``{a: 1, b: 2}`` or ``[1, 2]`` stays whole)."""
    values, depth, current = [], 0, ""
    for char in text:
        if char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    return [*values, current]


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """``["dual.lr=0.1,1", "optim.lr=1e-3"]`` -> ``{"dual.lr": ["0.1", "1"], "optim.lr": ["1e-3"]}``."""
    from ace.config.schema import ConfigError

    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key or not text:
            raise ConfigError(f"sweep: {item!r} is not of the form key=v1,v2,...")
        if key in grid:
            raise ConfigError(f"sweep: key {key!r} given twice")
        grid[key] = _split_values(text)
    return grid


def _run_name(overrides: Sequence[str], varying: set[str]) -> str:
    parts = [o for o in overrides if o.partition("=")[0] in varying]
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", "_".join(parts)) or "run"


def sweep(config: str | Path, grid: dict[str, Sequence[str]] | Sequence[str], out_dir: str | Path) -> str:
    """Train every combination of ``grid`` (``{key: [values]}`` or ``["key=v1,v2", ...]``) in turn.

    Each run goes to ``out_dir/<key=value_...>`` (only the keys with several values name it). Finished
    runs (with ``summary.json``) are skipped and unfinished ones resumed, so calling again after an
    interruption finishes the sweep. Every config is checked before the first run starts, and a run
    directory whose saved config differs (e.g. other fixed overrides) stops the sweep before it trains.
    Returns the :func:`compare` table of all the grid's runs, also written to ``out_dir``.
    """
    from ace import experiment
    from ace.config.loading import load_config

    values = (
        parse_grid(grid)
        if not isinstance(grid, dict)
        else {k: [str(v) for v in vs] for k, vs in grid.items()}
    )
    out_dir = Path(out_dir)
    varying = {k for k, vs in values.items() if len(vs) > 1}
    combos = [[f"{k}={v}" for k, v in zip(values, combo)] for combo in itertools.product(*values.values())]
    plan = [(out_dir / _run_name(overrides, varying), load_config(config, overrides)) for overrides in combos]
    stale = [
        f"{path.name} ({'; '.join(changes)})"
        for path, cfg in plan
        if (path / CONFIG).exists() and (changes := experiment.config_changes(path, cfg))
    ]
    if stale:  # a finished run of another config would be shown as this sweep's result
        raise experiment.RunDirError(
            f"{out_dir}: runs trained with another config: {', '.join(stale)}; remove them or sweep into "
            "another --out"
        )
    for i, (path, cfg) in enumerate(plan, 1):
        if (path / SUMMARY).exists():
            print(f"[{i}/{len(plan)}] {path.name}: finished, skipped")
            continue
        resume = (path / CONFIG).exists()
        print(f"[{i}/{len(plan)}] {path.name}: {'resuming' if resume else 'training'}")
        experiment.run(cfg, path, resume=resume)
    return compare([path for path, _ in plan], out=out_dir)
