"""Train a set of configs at one budget for several seeds and tabulate them.

    python benchmarks/compare.py nbody nbody_field --methods ace strict --seeds 3 --epochs 20 --out runs/cmp
    python benchmarks/compare.py configs/nbody.yaml:ace,strict train.batch_size=50
    python benchmarks/compare.py shapes:ace shapes_upright:ace_resilient --quick --out /tmp/cmp

Targets are config files or config names (``nbody`` is ``configs/nbody.yaml``), each optionally followed by
the methods to run it with: ``nbody:ace,strict``. ``--methods M ...`` gives the methods of every target that
names none; a target without methods runs with its config's own ``method``. Run ``<config>_<method>``
(:func:`ace.config.run_name`, e.g. ``nbody_strict``) is that config with ``method=<method>``. Arguments of the
form ``key=value`` are overrides applied to every run; ``--epochs E`` is ``train.epochs=E``; seed ``s`` is
``seed=s`` (s = 0 .. N-1).

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
import math
import multiprocessing
import shlex
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
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


class Run(NamedTuple):
    """One row of the table: config file ``path`` trained with ``method`` (None: the config's own)."""

    name: str
    path: Path
    method: str | None


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


def _train_one(config: str, overrides: list[str], out: str, threads: int) -> dict[str, Any]:
    """One training run in a worker process; resumes a run left without a summary."""
    import torch

    from ace.config import load_config
    from ace.experiment import run

    torch.set_num_threads(threads)
    cfg = load_config(config, overrides)
    holds = Path(out, "config.yaml").exists()
    return run(cfg, out, resume=holds)


def run_all(
    runs: list[Run],
    seeds: int,
    overrides: list[str],
    out: Path,
    jobs: int = 1,
    threads: int = 1,
    train: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """Train (or read back) every config for seeds 0 .. seeds-1; returns config name -> summaries.

    With ``train=False`` only finished runs are read (the table then counts the seeds it found)."""
    tasks, summaries = [], {r.name: [] for r in runs}
    for seed in range(seeds):  # seed-major: a run cut short still has every config at the first seeds
        for r in runs:
            run_dir = out / r.name / f"seed{seed}"
            done = run_dir / "summary.json"
            if done.exists():
                summaries[r.name].append(json.loads(done.read_text()))
            else:
                method = [f"method={r.method}"] if r.method else []
                tasks.append((r, [*overrides, *method, f"seed={seed}", "log.progress=false"], run_dir))
    if tasks and not train:
        print(f"compare: {len(tasks)} unfinished run(s) left out of the table", file=sys.stderr, flush=True)
        tasks = []
    if tasks:
        print(f"compare: training {len(tasks)} run(s), {jobs} at a time", file=sys.stderr, flush=True)
    if jobs == 1:  # in this process: no start-up cost
        import torch

        previous = torch.get_num_threads()
        try:
            for r, extra, run_dir in tasks:
                summaries[r.name].append(_train_one(str(r.path), extra, str(run_dir), threads))
                print(f"compare: done {run_dir}", file=sys.stderr, flush=True)
        finally:
            torch.set_num_threads(previous)
        return summaries
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [
            (r, run_dir, pool.submit(_train_one, str(r.path), extra, str(run_dir), threads))
            for r, extra, run_dir in tasks
        ]
        for r, run_dir, future in futures:
            summaries[r.name].append(future.result())
            print(f"compare: done {run_dir}", file=sys.stderr, flush=True)
    return summaries


def _metric_names(summaries: dict[str, list[dict[str, Any]]]) -> list[str]:
    from ace.compare import task_metrics
    from ace.run_data import best_val_test

    return task_metrics(
        name for runs in summaries.values() for s in runs for name in best_val_test(s)["model"]
    )


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def run_values(summary: dict[str, Any], metrics: list[str]) -> dict[str, Any]:
    """The numbers of one run that enter the table (keys in the module docstring)."""
    from ace.run_data import best_val_test

    best = best_val_test(summary)
    test = summary.get("test", {})
    values: dict[str, Any] = {
        "selected": best["selected"],
        "best_step": best["step"],
        "eq/best_step": best["eq_step"],
    }
    for m in metrics:
        values[m] = best["model"].get(m)
        values[f"eq/{m}"] = best["eq"].get(m)
    for m in metrics:
        final = test.get(f"test/{m}")
        values[f"final/{m}"] = final
        values[f"final/eq/{m}"] = test.get(f"test/eq/{m}", final)  # no gates: f_eq is the model itself
    values["deviation"] = test.get("test/deviation")
    gates = summary.get("gates") or {}
    values["max_abs_gate"] = max((abs(g) for g in gates.values()), default=None)
    slacks = [row["slack"] for row in summary.get("constraints", {}).values() if "slack" in row]
    values["max_slack"] = max(slacks, default=None)
    values["wall_time"] = summary.get("wall_time")
    return values


def aggregate(summaries: dict[str, list[dict[str, Any]]]) -> tuple[list[str], list[dict[str, Any]]]:
    """``(metric names, rows)``: per config, mean and std over seeds of each number of :func:`run_values`,
    the median best steps, and ``fallback``, the number of seeds without ``selected``."""
    metrics = _metric_names(summaries)
    rows = []
    for name, runs in summaries.items():
        per_run = [run_values(s, metrics) for s in runs]
        row: dict[str, Any] = {
            "config": name,
            "seeds": len(runs),
            "fallback": sum(not v["selected"] for v in per_run),
        }
        for key in per_run[0] if per_run else []:
            column = [v[key] for v in per_run]
            if key.endswith("best_step"):
                steps = [s for s in column if s is not None]
                row[key] = statistics.median(steps) if steps else None
            elif key != "selected":
                row[key] = _mean_std(column)
        rows.append(row)
    return metrics, rows


def _fmt(mean_std: tuple[float, float], digits: int = 3) -> str:
    mean, std = mean_std
    if math.isnan(mean):
        return "-"
    if math.isnan(std):
        return f"{mean:.{digits}g}"
    return f"{mean:.{digits}g} ± {std:.{digits - 1}g}"


def _steps(row: dict[str, Any]) -> str:
    steps = [row.get("best_step"), row.get("eq/best_step")]
    return " / ".join("-" if s is None else f"{s:g}" for s in steps)


def format_markdown(metrics: list[str], rows: list[dict[str, Any]]) -> str:
    """The comparison as a markdown table (and the fallback footnote when a row needs it)."""
    nothing = (math.nan, math.nan)
    header = ["config", "seeds"]
    for m in metrics:
        header += [f"test {m} (relaxed)", f"test {m} (f_eq)"]
    header.append("median best step (relaxed / f_eq)")
    for m in metrics:
        header += [f"test {m} (relaxed, final)", f"test {m} (f_eq, final)"]
    header += ["deviation (relaxed, final)", "max abs gate", "max slack", "wall time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        mark = " †" if row["fallback"] else ""
        cells = [f"`{row['config']}`", str(row["seeds"])]
        for m in metrics:
            cells += [_fmt(row.get(k, nothing)) + mark for k in (m, f"eq/{m}")]
        cells.append(_steps(row))
        for m in metrics:
            cells += [_fmt(row.get(k, nothing)) for k in (f"final/{m}", f"final/eq/{m}")]
        cells += [
            _fmt(row.get("deviation", nothing), 2),
            _fmt(row.get("max_abs_gate", nothing), 2),
            _fmt(row.get("max_slack", nothing), 2),
            _fmt(row.get("wall_time", nothing), 3),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "test (relaxed) and (f_eq): at each variant's own best validation step (summary.json `selected`); "
        "(final): at the last step.",
    ]
    fallbacks = [f"`{row['config']}` {row['fallback']} of {row['seeds']}" for row in rows if row["fallback"]]
    if fallbacks:
        lines.append(
            "† seeds without `selected` in summary.json (older runs), whose final test values stand in: "
            + ", ".join(fallbacks)
            + "."
        )
    return "\n".join(lines)


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
        runs, args.seeds, overrides, out, jobs=args.jobs, threads=args.threads, train=not args.table_only
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
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
