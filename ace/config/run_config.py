"""A run directory's config: the one it was trained with, and how a new config differs from it."""

from __future__ import annotations

from pathlib import Path

import yaml

from ace.config.loading import config_from_dict, config_to_dict
from ace.config.schema import Config
from ace.runs.layout import CONFIG, RunDirError

__all__ = ["RESUMABLE_CHANGES", "config_changes", "load_run_config"]

#: keys that may differ between a run and its resumption (extending a run, quieter output)
RESUMABLE_CHANGES = {("train", "epochs"), ("train", "max_steps"), ("log", "progress")}


def config_changes(out: str | Path, cfg: Config) -> list[str]:
    """``key: old -> new`` for every key where ``cfg`` differs from the config saved in the run directory
    ``out``, apart from those a resume may change (the run length, the progress bar). ``ace sweep`` can
    tell from it that a finished run was trained with other fixed overrides."""
    saved = _saved_config(Path(out) / CONFIG)
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


def load_run_config(out: str | Path) -> Config:
    """The resolved config saved in a run directory."""
    path = Path(out) / CONFIG
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
