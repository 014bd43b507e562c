"""Time per training step of ``ace.Trainer`` against a hand-written PyTorch loop on the same model and data.

    python benchmarks/overhead.py            # about 2 minutes on 2 CPU cores
    python benchmarks/overhead.py --quick    # smoke test: a few seconds, numbers not meaningful

Three models, each built by :func:`ace.experiment.prepare_run` from a shipped config:

* ``nbody``: the relaxed EGNN of ``configs/nbody.yaml`` (4 layers, batch of 100 systems);
* ``toy-gated``: the relaxed ``RadialVectorNet`` of ``configs/toy_relaxed.yaml`` (batch 64);
* ``toy-mlp``: the plain MLP of ``configs/toy.yaml`` (batch 64; no gates, so deviation rows only).

For each model the plain loop is ``zero_grad; loss_fn(model(x), y).backward(); optimiser.step()`` with a
copy of the same model and the same optimisers (Adam for the weights, SGD for the gates), on the same
pre-collated batches (data loading is not timed). Every trainer variant runs through
``Trainer.train_step`` and writes the records it returns, as ``Trainer.fit`` does. The variants and the
plain loop take turns in one process, ``--block`` steps at a time in a rotating order, for ``--reps``
rounds after ``--warmup`` rounds; each cell is the median per-step time over the rounds, and the ratio is
the median over the rounds of trainer / plain loop of the same model in that round (the machine's speed
drifts between rounds; the two blocks of one round share it). Times are CPU times of this process
(``time.process_time``) with one torch thread: on cores shared with other work, wall-clock times also count
the time the process waits for a core, which other processes' load changes from one round to the next.

Rows and their targets (issues 8 and 13):

* ``gate (ACE)``: ``GateConstraint(equality=True)`` with the config's dual settings, a record every 50
  steps; target <= 1.02 x the plain loop of the same relaxed EGNN, <= 1.05 x on the small toy network (its
  ~6 ms step leaves the constrained step's fixed cost more visible);
* ``deviation k=K``: ``DeviationConstraint(samples=K)`` (the K transformed copies go through the model in
  one batched forward pass); the plain loop computes the plain loss only, so the extra forward of
  K x batch inputs is part of the cost: target <= (1 + K) x plain + 5 %;
* ``gate, log every 1`` / ``log every 50``: the gate row with a JSONL record (written and flushed to a
  file) every step or every 50 steps.

The last column counts the operators each step dispatches to kernels, forward and backward (plain loop /
trainer, counted by a ``TorchDispatchMode`` over 4 steps): on a small model the fixed cost per step is mostly
per-operator overhead, and the count is the same on a loaded machine and an idle one. The last line is the
gate-constraint ratio of every gated model.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ace.config import load_config  # noqa: E402
from ace.experiment import make_optimizer, prepare_run  # noqa: E402
from ace.runs.metrics import format_table  # noqa: E402

#: (model label, config file, overrides shared by all its variants)
MODELS = {
    "nbody": ("nbody.yaml", ["data.train_size=1000", "data.val_size=10", "data.test_size=10"]),
    "toy-gated": ("toy_relaxed.yaml", []),
    "toy-mlp": ("toy.yaml", ["method=ace"]),
}
QUICK_SIZES = {"nbody": ["data.train_size=40", "train.batch_size=20"], "toy-gated": [], "toy-mlp": []}


@dataclass
class Variant:
    """One trainer set-up to time against the plain loop of its model."""

    label: str
    overrides: list[str]
    target: float | None  # ratio target
    logged: bool = False  # write records to a JSONL file in a temporary run directory


def variants(model: str, ks: list[int]) -> list[Variant]:
    rows = []
    if model != "toy-mlp":
        rows += [
            Variant(
                "gate (ACE)", ["constraint.kind=gate", "log.every=50"], 1.02 if model == "nbody" else 1.05
            ),
            Variant("gate, log every 1", ["constraint.kind=gate", "log.every=1"], None, logged=True),
            Variant("gate, log every 50", ["constraint.kind=gate", "log.every=50"], None, logged=True),
        ]
    for k in ks:
        overrides = ["constraint.kind=deviation", f"constraint.samples={k}", "log.every=50"]
        rows.append(Variant(f"deviation k={k}", overrides, 1 + k + 0.05))
    return rows


def plain_step(model: torch.nn.Module, optimizers: list, loss_fn: Callable, batch: Any) -> None:
    """The hand-written loop: what a user would write without ace."""
    inputs, target = (batch, batch.y) if hasattr(batch, "num_nodes") else batch
    for o in optimizers:
        o.zero_grad()
    loss_fn(model(inputs), target).backward()
    for o in optimizers:
        o.step()


def trainer_step(trainer, batch: Any) -> None:
    """One step the way ``Trainer.fit`` takes it: ``train_step`` and the record it returns, if any."""
    record = trainer.train_step(batch)
    if record is not None:
        trainer.write(record)


def build(model: str, variant: Variant | None, extra: list[str], cache: str, run_dir: str | None):
    """``(step function, batches)``: a trainer of ``variant``, or the plain loop when it is None."""
    config, overrides = MODELS[model]
    cfg = load_config(
        ROOT / "configs" / config,
        overrides
        + extra
        + [f"data.cache_dir={cache}"] * (model == "nbody")
        + ["train.threads=1", "log.progress=false"]
        + (variant.overrides if variant else []),
    )
    trainer, loaders = prepare_run(cfg, run_dir)
    batches = list(loaders["train"])
    if variant is not None:
        return (lambda b: trainer_step(trainer, b)), batches, trainer
    net = copy.deepcopy(trainer.model)  # the same (relaxed) model, free of the trainer
    optimizers = make_optimizer(cfg, net)
    trainer.close()
    return (lambda b: plain_step(net, optimizers, trainer.loss_fn, b)), batches, None


def time_block(step: Callable, batches: list, start: int, block: int) -> float:
    """CPU seconds per step over ``block`` steps, cycling through ``batches`` from ``start``."""
    t0 = time.process_time()
    for i in range(block):
        step(batches[(start + i) % len(batches)])
    return (time.process_time() - t0) / block


class _OpCounter(TorchDispatchMode):
    """Counts the operators that reach the kernels (after autograd and composite decompositions)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def op_count(step: Callable, batches: list, steps: int = 4) -> float:
    """Operators dispatched per step, forward and backward: a cost that the load of a shared machine cannot
    blur, unlike the times."""
    with _OpCounter() as counter:
        for i in range(steps):
            step(batches[i % len(batches)])
    return counter.count / steps


def measure(model: str, ks: list[int], args, extra: list[str], cache: str, tmp: str) -> list[list[Any]]:
    """Rows ``[model, variant, plain ms, trainer ms, ratio, target, ok, ops plain / trainer]`` of a model."""
    rows = variants(model, ks)
    plain, batches, _ = build(model, None, extra, cache, None)
    contenders: list[tuple[str, Callable]] = [("plain", plain)]
    trainers = []
    for i, v in enumerate(rows):
        run_dir = os.path.join(tmp, f"{model}-{i}") if v.logged else None
        step, _, trainer = build(model, v, extra, cache, run_dir)
        contenders.append((v.label, step))
        trainers.append(trainer)
    times: dict[str, list[float]] = {label: [] for label, _ in contenders}
    for r in range(args.warmup + args.reps):
        shift = r % len(contenders)  # rotate the order: no variant always runs right after another
        for label, step in contenders[shift:] + contenders[:shift]:
            seconds = time_block(step, batches, r * args.block, args.block)
            if r >= args.warmup:
                times[label].append(seconds)
    ops = {label: op_count(step, batches, 1 if args.quick else 4) for label, step in contenders}
    for trainer in trainers:
        trainer.close()
    base = statistics.median(times["plain"])
    table = []
    for v in rows:
        t = statistics.median(times[v.label])
        # the median of each round's ratio: the machine's speed drifts between rounds, and the pair's times
        # within one round share it
        ratio = statistics.median(a / b for a, b in zip(times[v.label], times["plain"]))
        ok = "" if v.target is None else ("yes" if ratio <= v.target else "NO")
        target = "" if v.target is None else f"<= {v.target:.2f}"
        row = [model, v.label, f"{1e3 * base:.2f}", f"{1e3 * t:.2f}", f"{ratio:.3f}", target, ok]
        table.append([*row, f"{ops['plain']:.0f} / {ops[v.label]:.0f}"])
    return table


def main(argv: list[str] | None = None) -> list[list[Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run: checks the script, not the speed")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--reps", type=int, default=15, help="timed rounds (median over them)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--block", type=int, default=10, help="steps per contender per round")
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 2, 4], help="k of the deviation rows")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.warmup, args.block = 1, 0, 1
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, 1 thread (torch.set_num_threads(1)), {os.cpu_count()} CPU cores "
        "shared with other work: process CPU time per step, expect a few % of noise; medians of "
        f"{args.reps} rounds x {args.block} steps after {args.warmup} warm-up rounds"
        + (" (--quick: NOT a measurement)" if args.quick else ""),
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "data")
        for model in args.models:
            extra = QUICK_SIZES[model] if args.quick else []
            rows += measure(model, args.samples, args, extra, cache, tmp)
    header = ["model", "trainer", "plain ms/step", "trainer ms/step", "ratio", "target", "met", "ops/step"]
    print(format_table(header, rows))
    gates = [f"{r[0]} {r[4]}x" for r in rows if r[1] == "gate (ACE)"]
    print("gate-constraint ratio (trainer / plain loop): " + (", ".join(gates) or "no gated model run"))
    return rows


if __name__ == "__main__":
    main()
