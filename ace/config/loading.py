"""Configs: YAML files, dotted overrides, validation and the key reference (schema: :mod:`ace.config.schema`).

A config is YAML with the sections of :class:`Config`. The ``data`` and ``model`` sections belong to
the task named in ``task.name``: each task module defines its own ``DataConfig`` and ``ModelConfig``.
Every key is documented in its field's ``help`` (``ace config --reference`` prints them all), and a
key that does not exist, a value of the wrong type or an impossible value stops with an error that
names the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ace.config.schema import (
    MAX_SEED,
    SCHEMA_VERSION,
    TASKS,
    Config,
    ConfigError,
    TaskConfig,
)
from ace.constrained.scale import check_scale

__all__ = [
    "load_config",
    "load_raw",
    "run_name",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "apply_overrides",
    "task_module",
]

# --------------------------------------------------------------------------- loading


def task_module(name: str) -> types.ModuleType:
    """The module of a built-in task (imported on demand: extras stay optional)."""
    if name not in TASKS:
        raise ConfigError(f"task.name: unknown task {name!r}; choose one of {sorted(TASKS)}")
    try:
        return importlib.import_module(TASKS[name])
    except ImportError as err:
        extra = {"nbody": "graphs", "shapes": "points", "modelnet40": "points"}.get(name, "all")
        raise ConfigError(
            f"task {name!r} needs an optional dependency ({err.name}): "
            f"pip install 'ace-equivariance[{extra}]'"
        ) from err


def _section_classes(task: str) -> dict[str, type]:
    module = task_module(task)
    return {"data": module.DataConfig, "model": module.ModelConfig}


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply ``key=value`` overrides, validate, and return a :class:`Config`."""
    return config_from_dict(apply_overrides(load_raw(path), overrides))


def load_raw(path: str | Path) -> dict:
    """A config file's YAML as a dict, unvalidated (errors name the file and the line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from err
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file: {err.strerror or err}") from err
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as err:  # one line: where, and what
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config is a mapping of sections, got {type(raw).__name__}")
    return raw


def run_name(path: str | Path, method: str) -> str:
    """The name of a run of config file ``path`` under ``method``: ``<stem>_<method>`` (``nbody_strict``
    for ``configs/nbody.yaml method=strict``), so that one config's methods never share a run directory;
    the stem alone where it already ends with the method (ace 0.1's per-method files, ``nbody_ace.yaml``)."""
    stem = Path(path).stem
    return stem if stem.endswith(f"_{method}") else f"{stem}_{method}"


class _DuplicateKey(yaml.constructor.ConstructorError):
    """A key given twice in one YAML mapping."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (not: the last wins)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise _DuplicateKey(None, None, f"duplicate key {key!r} in a mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Set dotted keys (``train.epochs=2``) in a raw config dict; values are parsed as YAML."""
    raw = _deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            value = yaml.load(text, Loader=_UniqueKeyLoader) if text else ""
        except _DuplicateKey as err:
            raise ConfigError(f"override {item!r}: {err.problem}") from err
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                node[part] = {"type": node[part]} if part == "tolerance" else {}
            node = node[part]
        node[parts[-1]] = value
    return raw


def _deepcopy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _deepcopy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deepcopy(v) for v in obj]
    return obj


def config_from_dict(raw: dict) -> Config:
    """Build and validate a :class:`Config` from a plain dict (as read from YAML)."""
    raw = dict(raw)
    schema = raw.get("schema", SCHEMA_VERSION)
    if isinstance(schema, int) and schema > SCHEMA_VERSION:
        raise ConfigError(
            f"schema: this config is for schema {schema}, newer than this ace supports ({SCHEMA_VERSION}); "
            "upgrade ace"
        )
    if isinstance(schema, int) and not isinstance(schema, bool) and schema < SCHEMA_VERSION:
        raise ConfigError(f"schema: {schema} is not a schema of ace; this ace reads schema {SCHEMA_VERSION}")
    task = raw.get("task") or {}
    if isinstance(task, str):  # `task: toy` as a shorthand
        raw["task"] = task = {"name": task}
    if not isinstance(task, dict):
        raise ConfigError(f"task: expected a mapping with 'name', got {task!r}")
    name = task.get("name", TaskConfig.name)
    sections = _section_classes(name) if name in TASKS else {}
    cfg = _build(Config, raw, "", sections)
    _validate(cfg)
    return cfg


def _build(cls: type, raw: Any, prefix: str, sections: dict[str, type] | None = None) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(fields)})"
        raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        section = (sections or {}).get(name)
        if section is not None:
            kwargs[name] = _build(section, raw.get(name), key + ".")
        elif dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], raw.get(name), key + ".")
        elif name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], key)
        choices = f.metadata.get("choices")
        if choices and name in kwargs and kwargs[name] not in choices:
            raise ConfigError(f"{key}: {kwargs[name]!r} is not one of {list(choices)}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        message = str(err)
        raise ConfigError(
            message if prefix.rstrip(".") in message else f"{prefix.rstrip('.')}: {message}"
        ) from err


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a type hint; accept ints for floats and '1e-3' strings for numbers."""
    if hint is Any:
        return _numeric_strings(value)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if not isinstance(value, int) or abs(value) < 2**1000 else math.inf
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # an inf or nan would only surface as a non-finite loss later
                raise ConfigError(f"{key}: must be a finite number, got {value!r}")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            return type(value)(value) if origin is list else tuple(value)
    else:
        return value
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{key}: expected {name}, got {value!r} ({type(value).__name__})")


def _numeric_strings(value: Any) -> Any:
    """PyYAML reads 1e-3 as a string: turn number-looking strings back into floats, recursively."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, dict):
        return {k: _numeric_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numeric_strings(v) for v in value]
    return value


def _validate(cfg: Config) -> None:
    """The bounds of single keys (``opt(above=, at_least=)``), then the checks that need several keys."""
    for key, value, (op, bound), nullable in _bounded(cfg):
        if value is None and nullable:
            continue
        if not (value > bound if op == ">" else value >= bound):
            raise ConfigError(f"{key}: must be {op} {bound:g}{' or null' if nullable else ''}, got {value!r}")
    if cfg.seed > MAX_SEED:
        raise ConfigError(f"seed: must be < 2**63, got {cfg.seed!r}")
    try:
        check_scale(cfg.dual.scale)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.constraint.heldout_after > 1:
        raise ConfigError(
            f"constraint.heldout_after: a fraction of the run, <= 1, got {cfg.constraint.heldout_after!r}"
        )
    if cfg.train.epochs == 0 and cfg.train.max_steps is None:
        raise ConfigError("train.epochs: 0 epochs and no train.max_steps would train nothing")
    from ace.config.schedule_specs import schedule_from_config
    from ace.constrained.constraints import check_tolerance
    from ace.constrained.schedules import is_nonincreasing

    for key in ("tolerance", "cr_schedule"):
        try:
            schedule = schedule_from_config(getattr(cfg.constraint, key), 1000)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"constraint.{key}: {err}") from err
        auto = getattr(schedule, "needs_start", False)
        if key == "tolerance":  # any start >= 0 shows the sign of the rest
            try:
                check_tolerance(schedule.resolve(start=1.0) if auto else schedule, "constraint.tolerance")
            except ValueError as err:
                raise ConfigError(str(err)) from None
        if key == "tolerance" and cfg.method == "scheduled" and not auto:
            if not is_nonincreasing(schedule, 1000):
                raise ConfigError(
                    "constraint.tolerance: method 'scheduled' tightens the tolerance, "
                    "but this schedule grows; "
                    "make end <= start"
                )


# --------------------------------------------------------------------------- output


def config_to_dict(cfg: Any) -> Any:
    """A plain dict (YAML-ready) of a config dataclass."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, list):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def _bounded(cfg: Config) -> list[tuple[str, Any, tuple[str, float], bool]]:
    """``(key, value, (">" or ">=", bound), may it be null?)`` of every bounded key of ``cfg``."""
    sections = [(getattr(cfg, f.name), f"{f.name}.") for f in dataclasses.fields(cfg)]
    out = []
    for owner, prefix in [(cfg, ""), *sections]:
        if not dataclasses.is_dataclass(owner):
            continue
        hints = typing.get_type_hints(type(owner))
        for f in dataclasses.fields(owner):
            if "bound" in f.metadata:
                nullable = type(None) in typing.get_args(hints[f.name])  # float | None
                out.append((prefix + f.name, getattr(owner, f.name), f.metadata["bound"], nullable))
    return out
