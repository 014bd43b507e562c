"""What a constrained run costs against strict: per step, and end to end with every evaluation counted.

    python benchmarks/run_cost.py                    # N-body and point clouds: about 15 minutes
    python benchmarks/run_cost.py --tasks nbody --steps 300
    python benchmarks/run_cost.py --quick            # smoke test: seconds, numbers not meaningful

For each task (its relaxed model's config, ``method=<method>``; the point clouds at small sizes, ``SIZES``),
built by :func:`ace.experiment.prepare_run` with one torch thread:

* **per step**: the median CPU time of ``Trainer.train_step`` over ``--reps`` rounds of ``--block`` steps,
  the methods taking turns in one process (the machine's speed drifts between rounds; one round shares it),
  and its ratio to strict's in the same round (median over rounds);
* **end to end**: a whole ``Trainer.fit`` of ``--steps`` steps (``STEPS`` by task) with validation at the
  config's cadence (``train.eval_every`` epochs, the README's: every 150 steps on N-body), the final test, the
  best checkpoints' tests and the held-out read-out, CPU time, ``--runs`` times in turn, the methods taking
  turns; its ratio to strict's in the same round (median over rounds), and the CPU time of its evaluations
  (the run's time less its training steps').

Methods: ``strict``, ``ace`` (the defaults), ``ace`` with ``optim.close_gates_below=1e-3`` (a closed gate's
branch is no longer computed) and ``ace`` with ``train.readout_every=0`` (the per-layer read-out only at the
end), and ``unconstrained``. Targets (issue 30): a relaxed step <= 1.2 x strict's, an ACE run <= 1.25 x.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ace.config import load_config  # noqa: E402
from ace.experiment import prepare_run  # noqa: E402

METHODS = {
    "strict": ("strict", []),
    "ace": ("ace", []),
    "ace, closing gates": ("ace", ["optim.close_gates_below=1.0e-3"]),
    "ace, read-out at the end": ("ace", ["train.readout_every=0"]),
    "unconstrained": ("unconstrained", []),
}
#: the config of each task's relaxed model
CONFIGS = {"nbody": "nbody.yaml", "shapes": "shapes.yaml", "toy": "toy_relaxed.yaml"}
#: the sizes of each task (the configs' own where none): the point clouds small enough to run in minutes
SIZES = {"shapes": ["data.train_size=256", "data.val_size=64", "data.test_size=128", "data.num_points=32"]}
#: steps of an end-to-end run: 4 validations at each config's cadence (N-body: 30 batches an epoch, validation
#: every 5 epochs; point clouds at SIZES: 8 batches an epoch, every 5 epochs)
STEPS = {"nbody": 600, "shapes": 160, "toy": 480}
QUICK = ["data.train_size=32", "data.val_size=16", "data.test_size=16", "train.batch_size=8"]


def build(task: str, method: str, extra: list[str], steps: int):
    overrides = [
        f"method={method}",
        "log.progress=false",
        f"train.max_steps={steps}",
        *SIZES.get(task, []),
        *extra,
    ]
    cfg = load_config(ROOT / "configs" / CONFIGS[task], overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer, loaders = prepare_run(cfg, None)
    return cfg, trainer, loaders


def per_step(task: str, args, extra: list[str]) -> dict[str, tuple[float, float]]:
    """{method: (median seconds a step, median ratio to strict)}."""
    built = {name: build(task, method, [*more, *extra], 10**9) for name, (method, more) in METHODS.items()}
    batches = {
        name: [b for _, b in zip(range(args.block), loaders["train"])]
        for name, (_, _, loaders) in built.items()
    }
    times: dict[str, list[float]] = {name: [] for name in built}
    for rep in range(args.warmup + args.reps):
        for name, (_, trainer, _) in built.items():
            start = time.process_time()
            for batch in batches[name]:
                trainer.train_step(batch)
            if rep >= args.warmup:
                times[name].append((time.process_time() - start) / len(batches[name]))
    return {
        name: (
            statistics.median(ts),
            statistics.median(t / s for t, s in zip(ts, times["strict"], strict=True)),
        )
        for name, ts in times.items()
    }


def _timed(step, seconds: list[float]):
    """``step`` adding its CPU time to ``seconds[0]``."""

    def timed(*args, **kwargs):
        start = time.process_time()
        try:
            return step(*args, **kwargs)
        finally:
            seconds[0] += time.process_time() - start

    return timed


def end_to_end(task: str, args, extra: list[str]) -> dict[str, tuple[float, float, float]]:
    """{method: (median CPU seconds of a whole fit, median ratio to strict's, median evaluation seconds)}."""
    steps = args.steps or STEPS[task]
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    evaluations: dict[str, list[float]] = {name: [] for name in METHODS}
    for _ in range(args.runs):
        for name, (method, more) in METHODS.items():
            cfg, trainer, loaders = build(task, method, [*more, *extra], steps)
            training = [0.0]  # CPU seconds in training steps
            trainer.train_step = _timed(trainer.train_step, training)  # type: ignore[method-assign]
            start = time.process_time()
            trainer.fit(
                loaders["train"],
                loaders["val"],
                epochs=-(-steps // len(loaders["train"])),
                max_steps=steps,
                eval_every=cfg.train.eval_every,
                test_loader=loaders["test"],
                print_summary=False,
            )
            times[name].append(time.process_time() - start)
            evaluations[name].append(times[name][-1] - training[0])
    return {
        name: (
            statistics.median(ts),
            statistics.median(t / s for t, s in zip(ts, times["strict"], strict=True)),
            statistics.median(evaluations[name]),
        )
        for name, ts in times.items()
    }


def main(argv: list[str] | None = None) -> list[list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["nbody", "shapes"], choices=list(CONFIGS))
    parser.add_argument(
        "--steps", type=int, default=None, help="steps of each end-to-end run (default: STEPS)"
    )
    parser.add_argument("--runs", type=int, default=3, help="end-to-end runs of each method (median)")
    parser.add_argument("--reps", type=int, default=10, help="timed rounds of the per-step timing")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--block", type=int, default=10, help="steps per method per round")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, not the speed")
    args = parser.parse_args(argv)
    extra = []
    if args.quick:
        args.steps, args.runs, args.reps, args.warmup, args.block = 8, 1, 1, 0, 2
        extra = QUICK
    torch.set_num_threads(1)
    rows = []
    for task in args.tasks:
        step = per_step(task, args, extra)
        whole = end_to_end(task, args, extra)
        for name in METHODS:
            seconds, ratio = step[name]
            run, run_ratio, evaluation = whole[name]
            rows.append(
                [
                    task,
                    name,
                    f"{1000 * seconds:.1f}",
                    f"{ratio:.2f}",
                    f"{run:.1f}",
                    f"{evaluation:.1f}",
                    f"{run_ratio:.2f}",
                ]
            )
    print(
        "\nend to end: validation at each config's cadence, the final test, the best checkpoints' tests and "
        "the held-out read-out included; CPU time, one thread\n"
    )
    print("| task | method | ms a step | step / strict | run (s) | of which evaluation (s) | run / strict |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return rows


if __name__ == "__main__":
    main()
