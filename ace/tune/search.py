"""``ace tune``: search a config's schedules, duals and slack costs with Optuna, on one machine or many.

Each trial is an ordinary run directory (``OUT/trials/trial_NNNN``) trained by :func:`ace.experiment.run`
from the config with the trial's values (:mod:`ace.tune.space`); trial 0 is the config as written. The
objective is read from the run's ``summary.json``, never from its test set: the best validation value of
the chosen variant (``model``, the relaxed model, or ``eq``, f_eq), the one the papers' protocol selects.
Test values are kept as trial attributes, for the report only.

The study lives in a journal file ``OUT/study.journal`` (several local workers, no server) or in a database
(``--storage postgresql://...``: every machine runs the same command and joins). Running the command again
continues the study: ``--trials`` counts finished trials (complete, pruned or failed). A trial's owner holds
an advisory lock (``OUT/trials/trial_NNNN.owner``) for the whole trial, which the kernel frees when its
process dies, even by SIGKILL; a trial left running with a free lock is adopted by the next worker on that
machine and its run resumed from its last checkpoint, so no trial stays "running" and no work is redone.

Pruning (median or Hyperband on the periodic validation records) waits for the homotopy: no trial is pruned
before every tolerance and gate schedule has reached its final value (:func:`homotopy_end`), as a looser
tolerance flatters the validation score, nor in the first quarter of its run (``PRUNE_AFTER``), nor before
four trials are complete (median pruner). A pruned run keeps its directory, with ``pruned.json`` saying so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import multiprocessing
import os
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ace.config.loading import apply_overrides, load_config, load_raw
from ace.config.schema import ConfigError
from ace.constrained.schedules import settles_at
from ace.runs.layout import CONFIG, SUMMARY
from ace.train.selection import higher_is_better
from ace.tune.space import Param, base_values, load_space, suggest

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: one worker per study folder
    fcntl = None  # type: ignore[assignment]

__all__ = ["TuneSettings", "tune", "homotopy_end", "trial_overrides"]

FINISHED = ("COMPLETE", "PRUNED", "FAIL")
#: no trial is pruned in this first fraction of its run (nor before its homotopy ends): early validation
#: scores rank runs by how fast they start, and the multipliers are still settling
PRUNE_AFTER = 0.25
#: complete trials before pruning starts: the median of fewer is noise
STARTUP_TRIALS = 4


@dataclasses.dataclass(frozen=True)
class TuneSettings:
    """What ``ace tune`` was asked (picklable: every worker process rebuilds its study from it)."""

    config: str
    space: str
    trials: int
    out: str
    overrides: tuple[str, ...] = ()
    storage: str | None = None
    study: str | None = None  # default: the name of the output folder
    variant: str = "model"
    metric: str | None = None  # default: the metric the run selects on (loss, accuracy, auc, ...)
    max_deviation: float | None = None
    pareto: bool = False
    pruner: str = "median"
    seed: int = 0
    threads: int = 1

    @property
    def name(self) -> str:
        return self.study or Path(self.out).resolve().name


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError("ace tune needs Optuna: pip install 'ace-equivariance[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _storage(settings: TuneSettings):
    optuna = _optuna()
    if settings.storage:
        return settings.storage
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(Path(settings.out) / "study.journal")))


def _directions(settings: TuneSettings, metric: str) -> list[str]:
    first = "maximize" if higher_is_better(metric) else "minimize"
    return [first, "minimize"] if settings.pareto else [first]


def _study(settings: TuneSettings, metric: str, worker: int = 0):
    """The study, created on first use; each worker samples from its own seed."""
    optuna = _optuna()
    sampler = optuna.samplers.TPESampler(seed=settings.seed + worker)  # it reads Trial.set_constraint
    if settings.pareto or settings.pruner == "none":
        pruner = optuna.pruners.NopPruner()  # Optuna prunes single-objective studies only
    elif settings.pruner == "hyperband":
        pruner = optuna.pruners.HyperbandPruner()
    else:
        pruner = optuna.pruners.MedianPruner(n_startup_trials=STARTUP_TRIALS)
    return optuna.create_study(
        study_name=settings.name,
        storage=_storage(settings),
        directions=_directions(settings, metric),
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )


def homotopy_end(trainer) -> int:
    """The step from which every tolerance schedule and the gate schedule of ``trainer`` hold their final
    value (0 when none changes): before it, a validation score flatters the constrained model."""
    schedules = [c.tolerance_at for c in trainer.constraints if callable(c.tolerance)]
    if trainer.core.primal.gate_schedule is not None:
        schedules.append(trainer.core.primal.gate_schedule)
    return max((settles_at(s, trainer.total_steps) for s in schedules), default=0)


class _Reporter:
    """A :attr:`Trainer.observers` entry: reports each validation value to the trial, prunes after the
    homotopy."""

    def __init__(self, trial, key: str) -> None:
        self.trial, self.key, self.end = trial, key, None

    def __call__(self, trainer, record: dict[str, Any]) -> None:
        value = record.get(self.key)
        if value is None:
            return
        if self.end is None:
            self.end = max(homotopy_end(trainer), math.ceil(PRUNE_AFTER * trainer.total_steps))
        step = record["step"]
        with warnings.catch_warnings():  # a resumed run reports its replayed steps again: Optuna keeps
            warnings.simplefilter("ignore")  # the first and warns
            self.trial.report(value, step)
        if step >= self.end and self.trial.should_prune():
            import optuna

            raise optuna.TrialPruned(f"pruned at step {step} ({self.key} = {value:.4g})")


def objective(summary: dict[str, Any], settings: TuneSettings, metric: str) -> tuple[list[float], dict]:
    """``(values, attributes)`` of a finished run: the chosen variant's best validation ``metric`` (and its
    validation deviation for a Pareto study); attributes hold the test values and the deviation."""
    selected = summary.get("selected") or {}
    variant = selected.get(settings.variant) or selected.get("model")  # a strict run has one variant
    if variant is None:
        raise ValueError("the run's summary.json has no selected step (no validation ran)")
    value = variant["val"][metric]
    deviation = variant["val"].get("relative_deviation", variant["val"].get("deviation", 0.0))
    attributes = {
        f"test/{k}": v for k, v in variant["test"].items() if not k.startswith(("deviation/", "rel"))
    }
    attributes |= {"val/deviation": deviation, "best_step": variant["step"]}
    if settings.max_deviation is not None:
        attributes["constraint"] = [deviation - settings.max_deviation]
    return ([value, deviation] if settings.pareto else [value]), attributes


def trial_overrides(settings: TuneSettings, params: list[Param], base: dict, values: dict) -> list[str]:
    """The overrides of the trial that sampled ``values`` (tied and conditional keys recomputed)."""
    import optuna

    return [*settings.overrides, *suggest(params, optuna.trial.FixedTrial(values), base)]


@contextlib.contextmanager
def _flock(path: Path, wait: bool) -> Iterator[bool]:
    """Hold an advisory lock on ``path``; yield False, holding nothing, if it is taken and not ``wait``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
        yield True
    finally:
        os.close(fd)


class _Worker:
    """One process's loop: adopt an orphaned trial of this machine, or start a new one, until enough have
    finished."""

    def __init__(self, settings: TuneSettings, worker: int) -> None:
        self.settings, self.out = settings, Path(settings.out)
        self.base = apply_overrides(load_raw(settings.config), list(settings.overrides))
        self.params = load_space(settings.space, self.base)
        self.metric = settings.metric or "loss"  # tune() sets it to the run's selection metric
        self.study = _study(settings, self.metric, worker)
        self.host = socket.gethostname()

    def owner_lock(self, number: int) -> Path:
        return self.out / "trials" / f"trial_{number:04d}.owner"

    def next_trial(self, stack: contextlib.ExitStack):
        """A trial to run, its owner lock held on ``stack``; None when the study has enough."""
        import optuna

        with _flock(self.out / ".tune.lock", wait=True):  # one worker of this machine chooses at a time
            trials = self.study.get_trials(deepcopy=False)
            for t in trials:
                if t.state.name == "RUNNING" and t.user_attrs.get("host") == self.host:
                    held = stack.enter_context(_flock(self.owner_lock(t.number), wait=False))
                    if held:  # its owner died: adopt it
                        print(f"ace tune: trial {t.number} was left running by a dead worker; resuming it")
                        return optuna.trial.Trial(self.study, t._trial_id)
                    stack.close()  # the other owner is alive; the lock was not ours
            finished = sum(t.state.name in FINISHED for t in trials)
            running = sum(t.state.name == "RUNNING" for t in trials)
            if finished + running >= self.settings.trials:
                return None
            trial = self.study.ask()
            stack.enter_context(_flock(self.owner_lock(trial.number), wait=True))
            trial.set_user_attr("host", self.host)
            trial.set_user_attr("run", str(self.out / "trials" / f"trial_{trial.number:04d}"))
            return trial

    def run_trial(self, trial, overrides: list[str]) -> None:
        import optuna

        from ace.experiment import run
        from ace.train.faults import Interrupted

        run_dir = self.out / "trials" / f"trial_{trial.number:04d}"
        try:
            cfg = load_config(self.settings.config, [*self.settings.overrides, *overrides])
            cfg.log.progress = False
            done = run_dir / SUMMARY
            if done.exists():  # finished before its worker died: only the verdict was lost
                summary = json.loads(done.read_text())
            else:
                key = f"val/{'eq/' if self.settings.variant == 'eq' else ''}{self.metric}"
                observers = [_Reporter(trial, key)] if not self.settings.pareto else []
                with contextlib.redirect_stdout(io.StringIO()):  # each run's balance table: in its folder
                    summary = run(cfg, run_dir, resume=(run_dir / CONFIG).exists(), observers=observers)
            values, attributes = objective(summary, self.settings, self.metric)
        except optuna.TrialPruned as pruned:
            (run_dir / "pruned.json").write_text(json.dumps({"trial": trial.number, "reason": str(pruned)}))
            self.study.tell(trial.number, state=optuna.trial.TrialState.PRUNED)
            print(f"ace tune: trial {trial.number} {pruned}")
            return
        except Interrupted:
            raise  # Ctrl-C or SIGTERM: the trial stays running with its checkpoint; the next run adopts it
        except Exception as err:  # noqa: BLE001 - a trial that cannot run fails alone; the study goes on
            trial.set_user_attr("error", f"{type(err).__name__}: {err}")
            self.study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            print(f"ace tune: trial {trial.number} failed: {type(err).__name__}: {err}")
            return
        for key, value in attributes.items():
            trial.set_user_attr(key, value)
        if self.settings.max_deviation is not None:  # feasible when <= 0
            trial.set_constraint("deviation", attributes["constraint"][0])
        self.study.tell(trial.number, values)
        shown = ", ".join(f"{v:.4g}" for v in values)
        print(f"ace tune: trial {trial.number} finished: {shown} ({' '.join(overrides)})", flush=True)

    def loop(self) -> None:
        while True:
            with contextlib.ExitStack() as stack:
                trial = self.next_trial(stack)
                if trial is None:
                    return
                try:
                    overrides = suggest(self.params, trial, self.base)
                except Exception as err:  # noqa: BLE001 - e.g. an enqueued value out of a choice list
                    trial.set_user_attr("error", f"{type(err).__name__}: {err}")
                    self.study.tell(trial.number, state="fail")
                    continue
                self.run_trial(trial, overrides)


def _work(settings: TuneSettings, worker: int) -> None:
    import torch

    torch.set_num_threads(settings.threads)
    _Worker(settings, worker).loop()


def tune(settings: TuneSettings, jobs: int = 1, retrain: tuple[int, int] | None = None) -> dict[str, Any]:
    """Run (or continue) the study with ``jobs`` local workers, then write its report into ``settings.out``;
    returns the report's summary (see :func:`ace.tune.report.write_report`). ``retrain=(K, S)`` then trains
    the config as written and the K best trials' configs, S seeds each (:func:`ace.tune.report.retrain`)."""
    from ace.tune.report import retrain as retrain_best
    from ace.tune.report import write_report

    if settings.trials < 1 or jobs < 1:
        raise ConfigError("ace tune: --trials and --jobs must be >= 1")
    import torch

    from ace.experiment import build_task, selection_metric

    cfg = load_config(settings.config, list(settings.overrides))
    task = build_task(cfg)
    if settings.metric is None:  # the run's own selection metric, which the workers need before any trial
        settings = dataclasses.replace(settings, metric=selection_metric(cfg, task))
    elif settings.metric not in ("loss", *task.metrics):
        raise ConfigError(
            f"ace tune: --metric {settings.metric!r} is not a metric of task '{cfg.task.name}'; "
            f"one of: loss, {', '.join(task.metrics)}"
        )
    Path(settings.out).mkdir(parents=True, exist_ok=True)
    first = _Worker(settings, 0)  # checks the config and the space before any trial starts
    if not first.study.get_trials(deepcopy=False):  # a new study: trial 0 is the config as written
        first.study.enqueue_trial(base_values(first.params, first.base), skip_if_exists=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)  # this process is worker 0
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_work, args=(settings, i)) for i in range(1, jobs)]
    for w in workers:
        w.start()
    try:
        first.loop()
    finally:
        for w in workers:
            w.join()
        torch.set_num_threads(threads)
    report = write_report(first.study, settings, first.params, first.base, first.metric)
    if retrain is not None:
        report["retrain"] = retrain_best(first.study, settings, first.params, first.base, *retrain, jobs=jobs)
    return report
