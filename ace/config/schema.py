"""The experiment schema: one dataclass per config section, every key with its default and help.

The ``data`` and ``model`` sections belong to the task named in ``task.name``: each task module defines its
own ``DataConfig`` and ``ModelConfig`` (with :func:`opt`). Loading, overrides and validation live in
:mod:`ace.config`, which re-exports these names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "SCHEMA_VERSION",
    "MAX_SEED",
    "METHODS",
    "TASKS",
    "ConfigError",
    "opt",
    "check_positive_ints",
    "TaskConfig",
    "RelaxConfig",
    "ConstraintConfig",
    "DualConfig",
    "OptimConfig",
    "TrainConfig",
    "LogConfig",
    "Config",
]

SCHEMA_VERSION = 1

#: seeds go to torch.manual_seed (and seed + small offsets): keep them in [0, 2**63)
MAX_SEED = 2**63 - 1

METHODS = ("strict", "unconstrained", "penalty", "ace", "ace_resilient", "ace_heldout", "scheduled", "cr")

TASKS = {
    "toy": "ace.tasks.toy",
    "nbody": "ace.tasks.nbody",
    "shapes": "ace.tasks.shapes",
    "modelnet40": "ace.tasks.modelnet",
    "images": "ace.tasks.images",
    "spectral": "ace.tasks.spectral",
}


class ConfigError(ValueError):
    """A config that cannot run: unknown key, wrong type or impossible value."""


def opt(
    default: Any,
    help: str,  # noqa: A002
    choices: tuple | None = None,
    above: float | None = None,
    at_least: float | None = None,
    **kw: Any,
) -> Any:
    """A documented config field; ``above``/``at_least``: its value must be ``> above`` / ``>= at_least`` (or
    null where the default is null), checked when a config is loaded and shown in the key reference."""
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if above is not None:
        meta["bound"] = (">", above)
    if at_least is not None:
        meta["bound"] = (">=", at_least)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def check_positive_ints(section: str, config: Any, *keys: str) -> None:
    """Raise ``ValueError("<section>.<key>: must be a positive integer, ...")`` for the first key of
    ``config`` that is not an int > 0 (a task's ``__post_init__`` check)."""
    for key in keys:
        value = getattr(config, key)
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"{section}.{key}: must be a positive integer, got {value!r}")


@dataclass
class TaskConfig:
    name: str = opt("toy", "which built-in task to run", choices=tuple(TASKS))


@dataclass
class RelaxConfig:
    gate_init: float = opt(1.0, "initial value of every gate gamma (f_eq + gamma * f_neq)")
    hidden: int = opt(
        64, "width of the default MLP branch f_neq, where the task does not supply its own", above=0
    )
    normalize: str = opt(
        "spectral",
        "bound every branch: 'spectral' normalises each linear map of f_neq (operator norm 1, bias norm "
        "<= 1), so abs(gamma_i) bounds how far layer i is from f_eq; 'none' leaves the branches free",
        choices=("spectral", "none"),
    )


@dataclass
class ConstraintConfig:
    kind: str = opt(
        "gate",
        "what is constrained: 'gate' (abs(gamma_i) per gated layer, needs a relaxed model) or 'deviation' "
        "(the measured equivariance deviation D of the whole model, any model)",
        choices=("gate", "deviation"),
    )
    tolerance: Any = opt(
        0.0,
        "eps(t) for methods 'scheduled' and 'penalty': a number, or a schedule such as "
        "{type: cosine, start: auto, end: 1.0e-3, steps: null} (types: constant, linear, cosine, geometric, "
        "piecewise, triangular, join; 'start: auto' = the value measured before the first step; "
        "'steps: null' = the whole run). 'ace' and 'ace_resilient' hold eps at 0",
    )
    samples: int = opt(
        1, "group elements sampled per step to estimate the deviation D (kind 'deviation')", above=0
    )
    relative: bool = opt(False, "divide D by the mean squared norm of f(x) (scale-free tolerance)")
    rho: float = opt(1.0, "slack cost rho/2 * u^2 of 'ace_resilient' (larger rho = less slack)", above=0)
    heldout_after: float = opt(
        0.5,
        "method 'ace_heldout': the fraction of the run after which each gated layer's branch is judged on "
        "the validation data (at the next validation); the slacks of the layers it does not help are held "
        "at 0",
        at_least=0,
    )
    penalty: float = opt(1.0, "fixed multiplier w of method 'penalty': loss + w * relu(g - eps)", at_least=0)
    cr_schedule: Any = opt(
        {"type": "triangular", "low": 0.0, "peak": 1.0},
        "gate value over training for method 'cr' (a schedule; gates set to 0 for the final model)",
    )


@dataclass
class DualConfig:
    formulation: str = opt(
        "augmented",
        "'augmented' (adds c/2 relu(g)^2: the damping of each gate-multiplier pair) or 'lagrangian'",
        choices=("lagrangian", "augmented"),
    )
    optimizer: str = opt(
        "sgd", "dual optimiser: 'sgd' (no momentum), 'nupi' or 'adam'", choices=("sgd", "nupi", "adam")
    )
    lr: float = opt(
        0.2,
        "dual step size eta_lambda; with the defaults the gate-multiplier pair is critically damped, "
        "eta_lambda = optim.gate_lr * c^2 / 4",
        above=0,
    )
    update: str = opt(
        "alternating",
        "'alternating' (dual step first, then the primal step with the new multipliers) or 'simultaneous'",
        choices=("simultaneous", "alternating"),
    )
    penalty_coefficient: float = opt(4.0, "c of the augmented Lagrangian: the damping of each gate", above=0)
    kp: float = opt(0.0, "nuPI proportional gain", at_least=0)
    ki: float = opt(1.0, "nuPI integral gain", at_least=0)
    init: float = opt(0.0, "initial multiplier value")
    scale: Any = opt(
        "initial",
        "unit of the multipliers: 'initial' (the mean loss of the first 20 steps: multipliers are prices "
        "relative to the untrained model's loss, rho is relative to it, no gain depends on the loss's "
        "units), "
        "'none' (units of the loss, as before ace 0.2) or a fixed positive number",
    )
    max_multiplier: float | None = opt(
        1.0e6, "ceiling on abs(multiplier): clamped there with a warning in the log (null = none)", above=0
    )


@dataclass
class OptimConfig:
    name: str = opt("adam", "primal optimiser", choices=("adam", "adamw", "sgd"))
    lr: float = opt(1.0e-3, "primal learning rate", above=0)
    weight_decay: float = opt(0.0, "weight decay (gates excluded)", at_least=0)
    gate_lr: float = opt(
        0.05,
        "learning rate eta_gamma of the gates (plain SGD on the loss-scaled gradient, stepped by ace: the "
        "multipliers' pull stays proportional)",
        above=0,
    )
    gates: str = opt(
        "ace",
        "who steps the gates: 'ace' (plain SGD at gate_lr on the loss-scaled Lagrangian) or 'optimizer' (the "
        "weights' optimiser optim.name at optim.lr, as in the ACE paper's code)",
        choices=("ace", "optimizer"),
    )
    momentum: float = opt(0.9, "momentum for 'sgd'", at_least=0)
    grad_clip: float | None = opt(
        None,
        "clip the gradient norm of the weights, and separately of the gates, to this value (null = off)",
        above=0,
    )
    slack_lr: float = opt(1.0e-2, "learning rate of the slacks u of 'ace_resilient' (SGD)", above=0)
    gate_max_step: float | None = opt(
        0.1,
        "largest change of a gate in one step, a trust region safe at any loss scale (null = none)",
        above=0,
    )
    close_gates_below: float | None = opt(
        None,
        "method 'ace': a gate below this is closed for good (set to 0, its branch no longer computed, an "
        "event 'gate_closed' in metrics.jsonl): the model is f_eq up to that layer, steps get cheaper as "
        "gates close and, once all are, a step and an evaluation cost about strict's (null = never)",
        above=0,
    )
    schedule: str = opt(
        "constant",
        "learning-rate schedule of the weights (not the gates): 'constant', 'cosine' (warm-up, then cosine "
        "to min_lr_factor * lr) or 'step' (times decay_factor every decay_every steps)",
        choices=("constant", "cosine", "step"),
    )
    warmup: float = opt(
        0.0, "linear warm-up of the learning rate: a fraction of the run (< 1) or steps (>= 1)", at_least=0
    )
    schedule_gates: bool = opt(
        True,
        "apply optim.schedule to the gates' learning rate too: their batch noise around equilibrium shrinks "
        "with it, so equality-constrained gates settle at 0 by the end (false: the gates keep optim.gate_lr)",
    )
    min_lr_factor: float = opt(0.0, "'cosine': the final learning rate as a fraction of optim.lr", at_least=0)
    decay_every: float | None = opt(
        None,
        "'step': steps between decays, or a fraction of the run (< 1); null = a third of the run",
        above=0,
    )
    decay_factor: float = opt(0.1, "'step': factor applied at each decay", above=0)


@dataclass
class TrainConfig:
    epochs: int = opt(10, "passes over the training set", at_least=0)
    max_steps: int | None = opt(None, "stop after this many steps (null = epochs decide)", above=0)
    batch_size: int = opt(32, "training batch size", above=0)
    eval_batch_size: int = opt(256, "batch size for validation and test", above=0)
    eval_every: int = opt(1, "epochs between validation passes", above=0)
    checkpoint_every: int = opt(
        1, "epochs between checkpoints (checkpoints/last.pt, previous.pt kept)", above=0
    )
    eval_samples: int = opt(
        4,
        "group elements per batch for the deviation reported at evaluation: a validation pass costs "
        "(1 + eval_samples) forward passes a batch for the model, as many for f_eq, and as many per gated "
        "layer for the read-out, less the layers these share (each computed once: f_eq's first layer is the "
        "model's, a layer's read-out starts after f_eq's layers before it; closed gates' variants are one)",
        above=0,
    )
    readout_every: int = opt(
        1,
        "validation passes between two measurements of the per-layer deviations and held-out benefits "
        "(the read-out of a relaxed model: for each gated layer, (1 + eval_samples) passes a batch through "
        "the layers from it on, one without its branch through the layers after it, and one pass of the "
        "model on transformed inputs; benchmarks/validation_cost.py measures it: about a doubling of a "
        "validation pass on N-body); 0 = only at the end (final validation, test and the best checkpoints "
        "always have them)",
        at_least=0,
    )
    readout_batches: int | None = opt(
        None,
        "measure the per-layer deviations and held-out benefits on the first validation and test batches "
        "only (null = all)",
        above=0,
    )
    device: str = opt(
        "cpu", "'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when available; under torchrun: the local rank's GPU)"
    )
    threads: int | None = opt(None, "torch CPU threads per process (null = torch's default)", above=0)
    select: str | None = opt(
        None,
        "validation metric that picks the best step of each variant (model and f_eq, separately), whose test "
        "metrics summary.json reports under 'selected': 'loss' or a task metric ('accuracy' is maximised); "
        "null = accuracy where the task has it, else loss",
    )
    on_nan: str = opt(
        "stop",
        "a NaN/Inf in loss, constraint, gradient or multiplier: 'stop' (error, last checkpoint intact), "
        "'skip' (drop that step) or 'rollback' (reload the last checkpoint, halve the learning rates, "
        "at most 3 times)",
        choices=("stop", "skip", "rollback"),
    )


@dataclass
class LogConfig:
    every: int = opt(10, "steps between records in metrics.jsonl", above=0)
    tensorboard: bool = opt(False, "also write TensorBoard scalars to RUN/tensorboard (needs tensorboard)")
    progress: bool | None = opt(None, "progress bar: true, false, or null (only when stderr is a terminal)")


@dataclass
class Config:
    seed: int = opt(0, "seeds data generation, initialisation, shuffling and group sampling", at_least=0)
    method: str = opt(
        "ace",
        "how to train: strict (f_eq only), unconstrained (relaxed, no constraint), "
        "penalty (fixed multiplier), ace (eps = 0, dual ascent), ace_resilient (eps = 0 plus learned slack), "
        "ace_heldout (ace_resilient whose slacks the validation data keep or hold at 0, once, at "
        "constraint.heldout_after), scheduled (eps(t) tightening), "
        "cr (gates on a fixed schedule, set to 0 at the end)",
        choices=METHODS,
    )
    schema: int = opt(SCHEMA_VERSION, "config schema version (files from a newer ace are refused)")
    task: TaskConfig = field(default_factory=TaskConfig, metadata={"help": "the task"})
    data: Any = field(default=None, metadata={"help": "the task's data settings"})
    model: Any = field(default=None, metadata={"help": "the task's model settings"})
    relax: RelaxConfig = field(default_factory=RelaxConfig, metadata={"help": "gated relaxation"})
    constraint: ConstraintConfig = field(
        default_factory=ConstraintConfig, metadata={"help": "the constraint"}
    )
    dual: DualConfig = field(default_factory=DualConfig, metadata={"help": "multiplier updates"})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "primal optimiser"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "training loop"})
    log: LogConfig = field(default_factory=LogConfig, metadata={"help": "logging"})
