"""Train a set of configs at one budget for several seeds and tabulate them.

    python benchmarks/compare.py nbody nbody_field --methods ace strict --seeds 3 --epochs 20 --out runs/cmp
    python benchmarks/compare.py configs/nbody.yaml:ace,strict train.batch_size=50
    python benchmarks/compare.py shapes:ace shapes_upright:ace_resilient --quick --out /tmp/cmp

Targets are config files or config names (``nbody`` is ``configs/nbody.yaml``), each optionally followed by
the methods to run it with: ``nbody:ace,strict``. ``--methods M ...`` gives the methods of every target that
names none; a target without methods runs with its config's own ``method``. Run ``<config>_<method>``
(:func:`ace.config.run_name`, e.g. ``nbody_strict``) is that config with ``method=<method>``. Arguments of the
form ``key=value`` are overrides applied to every run; ``--epochs E`` is ``train.epochs=E``; seed ``s`` is
``seed=s`` (s = 0 .. N-1). The configs share one data set across seeds (``data.seed``); ``--data-seeds`` gives
seed ``s`` its own, ``data.seed`` = the config's + ``s``, so that the seeds are independent draws of the data
too (the toy task's data already follow the run seed: it has no ``data.seed`` and is refused).

Each run goes through :func:`ace.experiment.run` into ``OUT/<config>_<method>/seed<s>``. The script is
resumable: a run whose ``summary.json`` exists is read, not trained again, and an interrupted run continues
from its last checkpoint. ``--jobs N`` > 1 runs N trainings at once, each in its own process; every
training uses ``--threads`` torch threads.

The table (stdout and ``OUT/table.md``) has one row per run name: mean ± std over seeds (sample std,
ddof = 1) of each test metric found in the summaries (``mse``, ``accuracy``, ...) AT THE BEST VALIDATION
STEP (``summary.json["selected"]``, the papers' protocol), for the relaxed model and for f_eq (the relaxed
model with every gate at 0; the same model for runs without gates), each variant selected on its own
validation metric; the median over seeds of each variant's best step; the same metrics at the final step
(columns "(final)"); the measured equivariance deviation of the final relaxed model on the test set, the
largest final ``|gamma|`` and slack, and the training wall time. A run whose summary has no ``selected``
(older runs) contributes its final values to the best-validation columns, marked † with a footnote.
``OUT/results.json`` holds every run's numbers: ``<metric>`` and ``eq/<metric>`` at the best validation step,
``final/<metric>`` and ``final/eq/<metric>``, ``best_step`` and ``eq/best_step``, and ``selected`` (False for
a fallback run).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
sys.path.insert(0, str(ROOT))

from ace.seeds import Run, aggregate, format_markdown, run_all, run_values  # noqa: E402

#: overrides of --quick: a smoke test of the whole pipeline, not a measurement
QUICK = [
    "train.epochs=1",
    "train.max_steps=3",
    "data.train_size=16",
    "data.val_size=8",
    "data.test_size=8",
    "train.batch_size=8",
    "log.progress=false",
]


def resolve_targets(
    targets: list[str],
    methods: list[str] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    configs_dir: Path = CONFIGS,
) -> list[Run]:
    """The runs of a list of targets ``FILE_OR_NAME[:METHOD,...]`` (order kept, duplicates dropped).

    ``methods`` stands in for a target's missing list; the run's name comes from the method it trains
    with, which for a target with none is its config's ``method`` after ``overrides``."""
    from ace.config import METHODS, ConfigError, load_config, run_name

    runs: list[Run] = []
    for target in targets:
        where, colon, listed = target.rpartition(":")
        if not colon:
            where, listed = target, ""
        path = Path(where) if where.endswith((".yaml", ".yml")) else configs_dir / f"{where}.yaml"
        if not path.is_file():
            raise SystemExit(f"compare: config not found: {where} (no {path})")
        wanted = listed.split(",") if listed else methods or [None]
        unknown = [m for m in wanted if m is not None and m not in METHODS]
        if unknown:
            raise SystemExit(
                f"compare: unknown method {unknown[0]!r} in {target!r}; one of {', '.join(METHODS)}"
            )
        for method in wanted:
            try:
                trained = method or load_config(path, overrides).method
            except ConfigError as err:
                raise SystemExit(f"compare: {err}") from None
            run = Run(run_name(path, trained), path, method)
            if run.name not in [r.name for r in runs]:
                runs.append(run)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "targets",
        nargs="+",
        help="config files or names, each optionally :METHOD,..., and key=value overrides",
    )
    from ace.config import METHODS

    parser.add_argument(
        "--methods", nargs="+", choices=METHODS, default=None, help="methods of every target that names none"
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per config (default 3)")
    parser.add_argument("--epochs", type=int, default=None, help="train.epochs for every run")
    parser.add_argument("--out", default="runs/compare", help="folder of the runs and the table")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 3 steps: a smoke test")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training (default 1)")
    parser.add_argument(
        "--data-seeds",
        action="store_true",
        help="seed s also draws its own data (data.seed = the config's + s): independent data per seed",
    )
    parser.add_argument(
        "--table-only", action="store_true", help="train nothing: tabulate the finished runs found in --out"
    )
    args = parser.parse_intermixed_args(argv)
    if args.seeds < 1 or args.jobs < 1 or args.threads < 1:
        parser.error("--seeds, --jobs and --threads must be >= 1")
    overrides = [t for t in args.targets if "=" in t]
    targets = [t for t in args.targets if "=" not in t]
    if not targets:
        parser.error("give at least one config file or name")
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.quick:
        overrides = [*QUICK, *overrides]
    runs = resolve_targets(targets, args.methods, overrides)
    out = Path(args.out)
    summaries = run_all(
        runs,
        args.seeds,
        overrides,
        out,
        jobs=args.jobs,
        threads=args.threads,
        train=not args.table_only,
        data_seeds=args.data_seeds,
    )
    metrics, rows = aggregate(summaries)
    table = format_markdown(metrics, rows)
    command = "python benchmarks/compare.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(f"`{command}`\n\n{table}\n", encoding="utf-8")
    results = {name: [run_values(s, metrics) for s in runs] for name, runs in summaries.items()}
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
