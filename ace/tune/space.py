"""The search space of ``ace tune``: config keys mapped to ranges, checked against the config schema.

A space file is YAML; every key is an ordinary dotted config key::

    dual.lr: {low: 1.0e-3, high: 1.0, log: true}          # a float, sampled on a log scale
    constraint.tolerance.fraction: {low: 0.1, high: 0.6}   # a float
    train.batch_size: {low: 16, high: 64, step: 16}        # an integer (low, high and step are integers)
    method: {choices: [ace, ace_resilient]}                # one of a list
    optim.slack_lr: {same_as: dual.lr}                     # tied: the value of another key of the space
    constraint.rho: {low: 0.1, high: 10.0, log: true, when: {method: ace_resilient}}

``when`` makes a key conditional: it is sampled only when every named key of the trial's config (the
config with the values sampled so far, keys in file order) has one of the given values. Each range's
bounds and each choice are applied to the config and validated as an override would be, before any
trial runs, so a space that cannot run stops with one line naming its key.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, TypeGuard

import yaml

from ace.config.loading import apply_overrides, config_from_dict, config_to_dict
from ace.config.schema import ConfigError

__all__ = ["Param", "load_space", "parse_space", "suggest", "as_override", "lookup"]

_FIELDS = {"low", "high", "log", "step", "choices", "same_as", "when"}
_MISSING = object()


@dataclasses.dataclass(frozen=True)
class Param:
    """One key of a search space: a range (``low``, ``high``, ``log``, ``step``), ``choices``, or
    ``same_as`` another key; ``when`` maps config keys to the values under which it is sampled."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None
    same_as: str | None = None
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    @property
    def integer(self) -> bool:
        numbers = [self.low, self.high] + ([self.step] if self.step is not None else [])
        return all(isinstance(v, int) and not isinstance(v, bool) for v in numbers)

    def values_to_check(self) -> list[Any]:
        """The values whose config must validate: both bounds, or every choice."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


def as_override(key: str, value: Any) -> str:
    """``key=value``, the value written as YAML (``1e-05`` as ``1.0e-05``, which reads back as a float)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def lookup(tree: dict, key: str) -> Any:
    """The value at dotted ``key`` of a nested dict, or a private marker if the path does not exist."""
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _param(key: str, spec: Any, earlier: dict[str, Param], where: str) -> Param:
    if not isinstance(key, str) or not key:
        raise ConfigError(f"{where}: a key must be a dotted config key, got {key!r}")

    def fail(problem: str) -> ConfigError:
        return ConfigError(f"{where}: {key}: {problem}")

    if not isinstance(spec, dict):
        raise fail("give a mapping such as {low: 0.1, high: 1.0}, {choices: [...]} or {same_as: KEY}")
    unknown = sorted(set(spec) - _FIELDS)
    if unknown:
        raise fail(f"unknown field {unknown[0]!r}; fields: {', '.join(sorted(_FIELDS))}")
    when = spec.get("when") or {}
    if not isinstance(when, dict):
        raise fail("'when' maps config keys to a value or a list of values")
    conditions = tuple((k, tuple(v) if isinstance(v, list) else (v,)) for k, v in when.items())
    kinds = [f for f in ("choices", "same_as") if f in spec] + (
        ["range"] if {"low", "high"} & set(spec) else []
    )
    if len(kinds) != 1:
        raise fail("give exactly one of: low and high (a range), choices, same_as")
    if "same_as" in spec:
        other = spec["same_as"]
        if other not in earlier:
            raise fail(f"same_as {other!r}: not a key given earlier in the space")
        if earlier[other].same_as is not None:
            raise fail(f"same_as {other!r}: that key is itself tied; name the key it follows")
        if set(spec) - {"same_as", "when"}:
            raise fail("a tied key takes only 'same_as' (and 'when')")
        return Param(key, same_as=other, when=conditions)
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise fail("choices must be a non-empty list")
        for choice in choices:
            if not (choice is None or isinstance(choice, (bool, int, float, str))):
                raise fail(f"choice {choice!r}: choices are numbers, strings, booleans or null")
        if set(spec) - {"choices", "when"}:
            raise fail("a choice takes only 'choices' (and 'when')")
        return Param(key, choices=tuple(choices), when=conditions)
    low, high, step, log = spec.get("low"), spec.get("high"), spec.get("step"), spec.get("log", False)
    if not (_is_number(low) and _is_number(high)):
        raise fail(f"low and high must both be finite numbers, got low={low!r}, high={high!r}")
    if low > high:
        raise fail(f"low ({low}) > high ({high})")
    if not isinstance(log, bool):
        raise fail(f"log must be true or false, got {log!r}")
    if log and low <= 0:
        raise fail(f"a log scale needs low > 0, got low={low}")
    if step is not None and not (_is_number(step) and step > 0):
        raise fail(f"step must be a number > 0, got {step!r}")
    if step is not None and log:
        raise fail("step and log cannot be combined (Optuna samples a log scale without steps)")
    return Param(key, low=low, high=high, log=log, step=step, when=conditions)


def parse_space(tree: Any, where: str = "space") -> list[Param]:
    """The :class:`Param` list of a space given as a dict (the YAML's content), keys in order."""
    if not isinstance(tree, dict) or not tree:
        raise ConfigError(f"{where}: a search space is a non-empty mapping of config keys to ranges")
    params: dict[str, Param] = {}
    for key, spec in tree.items():
        params[key] = _param(key, spec, params, where)
    return list(params.values())


def load_space(path: str | Path, base: dict) -> list[Param]:
    """Read a space file and check every bound and choice against ``base`` (a raw config dict with its
    overrides applied): each one, with the values its ``when`` names, must give a valid config."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read the search space {path}: {err.strerror or err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from err
    params = parse_space(tree, str(path))
    by_key = {p.key: p for p in params}
    for p in params:
        context = [as_override(k, values[0]) for k, values in p.when]
        followed = by_key[p.same_as] if p.same_as is not None else p  # a tied key takes the values it follows
        for value in followed.values_to_check():
            try:
                config_from_dict(apply_overrides(base, [*context, as_override(p.key, value)]))
            except ConfigError as err:
                raise ConfigError(
                    f"{path}: {p.key}: the value {value!r} gives no valid config: {err}"
                ) from None
    return params


def _resolved(base: dict, overrides: list[str]) -> dict:
    """The whole config (defaults included) as a dict, after ``overrides``."""
    return config_to_dict(config_from_dict(apply_overrides(base, overrides)))


def _holds(p: Param, config: dict) -> bool:
    return all(lookup(config, key) in values for key, values in p.when)


def suggest(params: list[Param], trial: Any, base: dict) -> list[str]:
    """Sample ``params`` in order on an Optuna ``trial`` (a trial that already holds a value, such as an
    enqueued or resumed one, returns it) and return the overrides that make the trial's config."""
    overrides: list[str] = []
    values: dict[str, Any] = {}
    for p in params:
        if p.when and not _holds(p, _resolved(base, overrides)):
            continue
        if p.same_as is not None:
            if p.same_as not in values:  # the key it follows was not sampled (its own condition failed)
                continue
            value = values[p.same_as]
        elif p.choices is not None:
            value = trial.suggest_categorical(p.key, list(p.choices))
        elif p.integer:
            value = trial.suggest_int(p.key, p.low, p.high, step=p.step or 1, log=p.log)
        else:
            value = trial.suggest_float(p.key, p.low, p.high, step=p.step, log=p.log)
        values[p.key] = value
        overrides.append(as_override(p.key, value))
    return overrides


def base_values(params: list[Param], base: dict) -> dict[str, Any]:
    """The config's own value of every sampled key (what trial 0 runs), where the key applies."""
    config = _resolved(base, [])
    values = {}
    for p in params:
        if p.same_as is None and _holds(p, config):
            value = lookup(config, p.key)
            if value is not _MISSING:
                values[p.key] = value
    return values
