"""From a config to a finished run directory: task -> relax -> constraints -> trainer -> logs.

``method`` picks the way of training, so every baseline is one switch on the same trainer:

==============  =========  ======================================================================
method          gates      constraint
==============  =========  ======================================================================
strict          none       none: the equivariant model f_eq alone
unconstrained   learned    none
penalty         learned    fixed multiplier: loss + w * relu(g - eps(t))
ace             learned    gamma_i = 0 (gate) or D <= 0 (deviation), dual ascent (ACE Alg. 1)
ace_resilient   learned    |gamma_i| <= u_i or D <= u, slack cost rho/2 u^2 (ACE Alg. 2)
ace_heldout     learned    ace_resilient (gates), each slack kept or held at 0 by held-out data
scheduled       learned    |gamma_i| <= eps(t) or D <= eps(t), eps(t) tightening
cr              scheduled  none: gates follow ``constraint.cr_schedule``, f_eq is the final model
==============  =========  ======================================================================
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ace.config.loading import config_to_dict, dump_config, task_module
from ace.config.run_config import config_changes, load_run_config
from ace.config.schedule_specs import schedule_from_config
from ace.config.schema import Config, ConfigError
from ace.constrained.constraints import Constraint, DeviationConstraint, GateConstraint
from ace.constrained.multipliers import DualSettings
from ace.constrained.schedules import Schedule, is_nonincreasing, lr_schedule
from ace.nn.relaxed import gates, relax
from ace.runs.checkpoint import CheckpointError
from ace.runs.layout import (
    CONFIG,
    RunDirError,
    check_writable,
    holds_run,
    last_checkpoint,
    last_good_checkpoint,
    locked,
    remove_unstarted,
    reset,
    write_config,
)
from ace.tasks.base import Task
from ace.train.heldout_slacks import HeldOutSlacks
from ace.train.trainer import Trainer
from ace.utils.distributed import join_process_group
from ace.utils.loaders import make_loader

__all__ = ["build_task", "method_setup", "make_optimizer", "prepare_run", "run", "trained_run"]


def build_task(cfg: Config) -> Task:
    torch.manual_seed(cfg.seed)
    return task_module(cfg.task.name).build(cfg.data, cfg.model, cfg.seed)


def method_setup(cfg: Config, task: Task, total_steps: int) -> tuple[bool, list[Constraint], Any]:
    """``(relax the model?, constraints, gate schedule)`` for ``cfg.method``."""
    method, c = cfg.method, cfg.constraint
    gated = task.relax_where is not None
    kind = c.kind
    if method in ("strict", "cr") or (kind == "gate" and method not in ("unconstrained",)):
        if not gated:
            raise ConfigError(
                f"method '{method}' with constraint.kind '{kind}' needs a model with an equivariant part and "
                f"gates, but task '{cfg.task.name}' with this model has none; use constraint.kind: deviation "
                "(or a relaxable model)"
            )
    if method == "ace_heldout" and kind != "gate":
        raise ConfigError(
            "method 'ace_heldout' judges each gated layer's branch: it needs constraint.kind: gate"
        )
    relaxed = gated and method != "strict"
    gate_schedule = schedule_from_config(c.cr_schedule, total_steps) if method == "cr" else None
    if method in ("strict", "unconstrained", "cr"):
        return relaxed, [], gate_schedule
    tolerance = schedule_from_config(c.tolerance, total_steps) if method in ("scheduled", "penalty") else 0.0
    if method == "scheduled" and isinstance(tolerance, Schedule) and tolerance.needs_start:
        tolerance = _Tightening(tolerance, total_steps)
    options: dict[str, Any] = dict(
        tolerance=tolerance,
        equality=method == "ace" and kind == "gate",
        resilient=method in ("ace_resilient", "ace_heldout"),
        rho=c.rho,
        penalty=c.penalty if method == "penalty" else None,
    )
    if kind == "gate":
        return relaxed, [GateConstraint(**options)], None
    return relaxed, [DeviationConstraint(samples=c.samples, relative=c.relative, **options)], None


class _Tightening(Schedule):
    """The tolerance of method 'scheduled' with ``start: auto``: checked not to grow once the start is known
    (the config check can only look at schedules with a number as start)."""

    def __init__(self, schedule: Schedule, total_steps: int) -> None:
        self.schedule, self.total_steps = schedule, total_steps

    @property
    def needs_start(self) -> bool:
        return self.schedule.needs_start

    def resolve(self, start: float) -> Schedule:
        resolved = self.schedule.resolve(start=start)
        if not is_nonincreasing(resolved, self.total_steps):
            raise ConfigError(
                "constraint.tolerance: method 'scheduled' tightens the tolerance, but from the measured "
                f"start {start:.4g} this schedule grows; make end smaller, or give start a number"
            )
        return resolved


def make_optimizer(cfg: Config, model: torch.nn.Module) -> list[torch.optim.Optimizer]:
    """The primal optimiser ``optim.name`` over the weights (the gates too with ``optim.gates: optimizer``).

    By default the gates are not in it: :class:`ace.PrimalDual` steps them with plain SGD, because an adaptive
    optimiser moves every parameter by about ``lr`` per step whatever its gradient: the multiplier's pull on
    a gate would then be blind to the multiplier's size, and gates overshoot past 0. Gates get no weight
    decay (it would bias them toward 0 outside the constraint).
    """
    gate_params = list(gates(model).values())
    gate_ids = {id(g) for g in gate_params}
    params = [p for p in model.parameters() if id(p) not in gate_ids]
    o = cfg.optim
    groups: list[dict[str, Any]] = [{"params": params, "weight_decay": o.weight_decay}]
    if gate_params and o.gates == "optimizer":
        groups.append({"params": gate_params, "weight_decay": 0.0})
    if o.name == "sgd":
        return [torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)]
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return [cls(groups, lr=o.lr)]


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist.is_available() and dist.is_initialized():
        name = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # one GPU per process
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(
            f"train.device: {name!r} is not a device torch knows; use 'cpu', 'cuda', 'cuda:N' or 'auto'"
        ) from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} asked for, but CUDA is not available")
    return device


def prepare_run(cfg: Config, out: str | Path | None) -> tuple[Trainer, dict[str, DataLoader]]:
    """Build the task, the (relaxed) model, the constraints and the trainer for ``cfg``.

    The trainer appends to a run already in ``out``: checking the directory is the caller's part (see
    :func:`run`).
    """
    return _make_trainer(cfg, _build_parts(cfg), out)


def _size_keys(cfg: Config) -> list[str]:
    """``key=value (default d)`` of every integer of data, model and relax set above its default."""
    found = []
    for section in ("data", "model", "relax"):
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            value, default = getattr(obj, f.name), f.default
            if isinstance(value, int) and isinstance(default, int) and value > default:
                found.append(f"{section}.{f.name}={value} (default {default})")
    return found


def _build_task_and_model(cfg: Config) -> Task:
    """:func:`build_task`, with an allocation failure reported as a config error naming the sizes."""
    try:
        return build_task(cfg)
    except (MemoryError, RuntimeError) as err:
        if not isinstance(err, MemoryError) and "alloc" not in str(err) and "memory" not in str(err):
            raise
        asked = re.search(r"allocate (\d+) bytes", str(err))
        amount = f"{int(asked.group(1)) / 2**30:.3g} GiB" if asked else "more memory than there is"
        sizes = "; ".join(_size_keys(cfg)) or "no size above its default"
        raise ConfigError(
            f"task '{cfg.task.name}' cannot be built: it asked for {amount}; sizes set above default: {sizes}"
        ) from err


def _build_parts(cfg: Config) -> dict[str, Any]:
    """Everything of a run but the trainer (which opens the log): config errors needing the task end here."""
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    device = _device(cfg.train.device)
    task = _build_task_and_model(cfg)
    if distributed and cfg.method == "ace_heldout":  # rank 0 validates: its decision would not reach the rest
        raise ConfigError("method 'ace_heldout' runs in one process (not under torchrun)")
    if distributed and cfg.train.batch_size % dist.get_world_size():
        world = dist.get_world_size()
        raise ConfigError(
            f"train.batch_size: {cfg.train.batch_size} does not split evenly over {world} processes"
        )
    loaders = {
        "train": make_loader(
            task.train, cfg.train.batch_size, shuffle=True, distributed=distributed, seed=cfg.seed
        ),
        "val": make_loader(task.val, cfg.train.eval_batch_size, shuffle=False),
        "test": make_loader(task.test, cfg.train.eval_batch_size, shuffle=False),
    }
    per_epoch = len(loaders["train"])
    total = cfg.train.epochs * per_epoch
    if cfg.train.max_steps is not None:
        total = min(total, cfg.train.max_steps) if cfg.train.epochs else cfg.train.max_steps
    relaxed, constraints, gate_schedule = method_setup(cfg, task, total)
    if cfg.train.select not in (None, "loss", *task.metrics):
        raise ConfigError(
            f"train.select: {cfg.train.select!r} is not a metric of task '{cfg.task.name}'; "
            f"choose loss or one of {sorted(task.metrics)}"
        )
    model = task.model
    if relaxed:
        assert task.relax_where is not None, "method_setup relaxes only a task with gated layers"
        relax(
            model,
            where=task.relax_where,
            branch=task.relax_branch,
            gate_init=cfg.relax.gate_init,
            hidden=cfg.relax.hidden,
            example=task.example,
            normalize=cfg.relax.normalize,
        )
    return {
        "task": task,
        "loaders": loaders,
        "constraints": constraints,
        "gate_schedule": gate_schedule,
        "total": total,
        "device": device,
    }


def _make_trainer(cfg: Config, parts: dict[str, Any], out: str | Path | None) -> tuple[Trainer, dict]:
    task, total, model = parts["task"], parts["total"], parts["task"].model
    d, o = cfg.dual, cfg.optim
    trainer = Trainer(
        model,
        task.loss,
        make_optimizer(cfg, model),
        symmetry=task.symmetry,
        constraints=parts["constraints"],
        dual=DualSettings(
            d.formulation, d.optimizer, d.lr, d.update, d.penalty_coefficient, d.kp, d.ki, d.init, d.scale
        ),
        metrics=task.metrics,
        gate_schedule=parts["gate_schedule"],
        grad_clip=cfg.optim.grad_clip,
        gate_max_step=cfg.optim.gate_max_step,
        lr_schedule=lr_schedule(o.schedule, total, o.warmup, o.min_lr_factor, o.decay_every, o.decay_factor),
        schedule_gates=o.schedule_gates,
        select=selection_metric(cfg, task),
        slack_lr=cfg.optim.slack_lr,
        gate_lr=o.gate_lr,
        step_gates=o.gates == "ace",
        eval_samples=cfg.train.eval_samples,
        readout_every=cfg.train.readout_every,
        readout_batches=cfg.train.readout_batches,
        log_dir=out,
        log_every=cfg.log.every,
        progress=cfg.log.progress,
        tensorboard=cfg.log.tensorboard,
        seed=cfg.seed,
        device=parts["device"],
        config=config_to_dict(cfg),
        on_nan=cfg.train.on_nan,
        max_multiplier=cfg.dual.max_multiplier,
        close_gates_below=cfg.optim.close_gates_below,
        resume=True,  # the caller has checked or cleared the directory
    )
    trainer.total_steps = total
    if cfg.method == "ace_heldout":
        after = math.ceil(cfg.constraint.heldout_after * total)
        trainer.observers.append(HeldOutSlacks(parts["loaders"]["val"], after_step=after))
    return trainer, parts["loaders"]


def selection_metric(cfg: Config, task: Task) -> str:
    """The validation metric that picks a run's best step: ``train.select``, else accuracy where the task
    measures it, else the loss."""
    return cfg.train.select or ("accuracy" if "accuracy" in task.metrics else "loss")


def run(
    cfg: Config,
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    observers: Sequence[Callable[[Trainer, dict[str, Any]], None]] = (),
) -> dict[str, Any]:
    """Train ``cfg`` into the run directory ``out`` and return the summary.

    A directory that already holds a run is refused unless ``resume`` (continue from its last good
    checkpoint, same config apart from the run length) or ``overwrite`` (start again). Under torchrun every
    process calls this; rank 0 alone writes the directory. ``observers`` join :attr:`Trainer.observers`.
    """
    out = Path(out)
    distributed = join_process_group(cfg.train.device)
    main = not distributed or dist.get_rank() == 0
    checkpoint = None
    held = holds_run(out)
    if held and resume:
        changed = config_changes(out, cfg) if (out / CONFIG).exists() else []
        if changed:
            raise RunDirError("--resume with a different config; changed keys: " + "; ".join(changed))
        checkpoint = last_good_checkpoint(out)
    elif held and not overwrite:
        raise RunDirError(
            f"{out} already holds a run; pass --resume to continue it or --overwrite to start again"
        )
    check_writable(out)
    parts = _build_parts(cfg)  # config errors that need the task or the model: before anything is written
    if distributed:
        dist.barrier()  # every rank has read the directory before rank 0 changes it
    created = [
        p for p in (out, *out.parents) if not p.exists()
    ]  # the folders this run makes, innermost first
    with locked(out, held) if main else contextlib.nullcontext():
        if main:
            if held and overwrite and not resume:
                reset(out)
            write_config(out, dump_config(cfg))
        trainer, loaders = _make_trainer(cfg, parts, out)
        trainer.observers.extend(observers)
        if checkpoint is not None:
            trainer.load_checkpoint(checkpoint)
        trainer.truncate_records(events=False)  # records after the checkpoint will be written again
        try:
            return trainer.fit(
                loaders["train"],
                loaders["val"],
                epochs=cfg.train.epochs or None,  # 0 epochs with train.max_steps: the steps decide
                max_steps=cfg.train.max_steps,
                eval_every=cfg.train.eval_every,
                checkpoint_every=cfg.train.checkpoint_every,
                test_loader=loaders["test"],
            )
        except ConfigError:  # found before the first step (a measured tolerance start): no half-made run
            if main and not held and trainer.step == 0:
                trainer.close()
                remove_unstarted(out, created)
            raise
        finally:
            trainer.close()


def trained_run(out: str | Path, what: str = "read") -> tuple[Config, Trainer, dict[str, DataLoader]]:
    """The config, a CPU trainer holding the model of ``out/checkpoints/last.pt``, and the data loaders of a
    run directory (for ``ace export`` and ``ace probe``); ``what`` names the caller in errors."""
    checkpoint = last_checkpoint(Path(out))
    cfg = load_run_config(out)
    if not checkpoint.exists():
        raise RunDirError(f"{out} has no checkpoint ({checkpoint}) to {what}")
    cfg.train.device = "cpu"
    trainer, loaders = prepare_run(cfg, None)
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        trainer.model.load_state_dict(state["model"])
    except Exception as err:  # unreadable or foreign: one clear message
        raise CheckpointError(f"cannot load the model from {checkpoint}: {err}") from err
    return cfg, trainer, loaders
