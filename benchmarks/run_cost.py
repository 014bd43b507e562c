"""What a constrained run costs against strict: per step, and end to end with every evaluation counted.

    python benchmarks/run_cost.py                    # N-body, about 15 minutes on 2 idle CPU cores
    python benchmarks/run_cost.py --tasks nbody shapes --steps 300
    python benchmarks/run_cost.py --quick            # smoke test: seconds, numbers not meaningful

For each task (its relaxed model's config, ``method=<method>``), built by :func:`ace.experiment.prepare_run`
with one torch thread:

* **per step**: the median CPU time of ``Trainer.train_step`` over ``--reps`` rounds of ``--block`` steps,
  the methods taking turns in one process (the machine's speed drifts between rounds; one round shares it),
  and its ratio to strict's in the same round (median over rounds);
* **end to end**: a whole ``Trainer.fit`` of ``--steps`` steps with validation every ``--steps / 4`` steps,
  the final test and the best checkpoints' tests, CPU time, ``--runs`` times in turn; the ratio to strict's.

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
QUICK = ["data.train_size=32", "data.val_size=16", "data.test_size=16", "train.batch_size=8"]


def build(task: str, method: str, extra: list[str], steps: int):
    overrides = [f"method={method}", "log.progress=false", f"train.max_steps={steps}", *extra]
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


def end_to_end(task: str, args, extra: list[str]) -> dict[str, float]:
    """{method: median CPU seconds of a whole fit, evaluations included}."""
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    for _ in range(args.runs):
        for name, (method, more) in METHODS.items():
            cfg, trainer, loaders = build(task, method, [*more, *extra], args.steps)
            epochs = -(-args.steps // len(loaders["train"]))
            every = max(1, epochs // 4)
            start = time.process_time()
            trainer.fit(
                loaders["train"],
                loaders["val"],
                epochs=epochs,
                max_steps=args.steps,
                eval_every=every,
                test_loader=loaders["test"],
                print_summary=False,
            )
            times[name].append(time.process_time() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> list[list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["nbody"], choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=300, help="steps of each end-to-end run")
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
            rows.append(
                [
                    task,
                    name,
                    f"{1000 * seconds:.1f}",
                    f"{ratio:.2f}",
                    f"{whole[name]:.1f}",
                    f"{whole[name] / whole['strict']:.2f}",
                ]
            )
    print(
        f"\n{args.steps}-step runs, validation 4 times, test and best checkpoints included; "
        "CPU time, one thread\n"
    )
    print("| task | method | ms a step | step / strict | run (s) | run / strict |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return rows


if __name__ == "__main__":
    main()
