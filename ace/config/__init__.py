"""Experiments as YAML: the schema (one dataclass per section), loading with dotted overrides and
validation, the key reference, and schedules to and from their YAML specs.

Imports :mod:`ace.constrained` and :mod:`ace.runs`.
"""

from ace.config.loading import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    load_raw,
    run_name,
    task_module,
)
from ace.config.schema import (
    MAX_SEED,
    METHODS,
    SCHEMA_VERSION,
    TASKS,
    Config,
    ConfigError,
    ConstraintConfig,
    DualConfig,
    LogConfig,
    OptimConfig,
    RelaxConfig,
    TaskConfig,
    TrainConfig,
    check_positive_ints,
    opt,
)

__all__ = [
    "MAX_SEED",
    "METHODS",
    "SCHEMA_VERSION",
    "TASKS",
    "Config",
    "ConfigError",
    "ConstraintConfig",
    "DualConfig",
    "LogConfig",
    "OptimConfig",
    "RelaxConfig",
    "TaskConfig",
    "TrainConfig",
    "apply_overrides",
    "check_positive_ints",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "load_raw",
    "opt",
    "run_name",
    "task_module",
]
