"""Several runs over several seeds: trained side by side, tabulated as the papers report them.

:func:`run_all` trains (or reads back) run ``name`` of config ``path`` for seeds 0 .. N-1 into
``OUT/<name>/seed<s>``: resumable (a finished run is read, an interrupted one continues from its checkpoint),
``jobs`` trainings at once in their own processes; with ``data_seeds``, seed ``s`` also draws its own data
(``data.seed`` = the config's + ``s``), so that the seeds are independent trials of the data too (the configs
share their data across run seeds). :func:`aggregate` and :func:`format_markdown` make the
table: per run, mean ± std over seeds (sample std) of each test metric AT THE BEST VALIDATION STEP
(``summary.json["selected"]``) for the relaxed model and for f_eq, each variant selected on its own
validation metric; the median best steps; the same metrics at the final step; the final relaxed model's
test deviation, largest ``|gamma|`` and slack, and the wall time. ``benchmarks/compare.py`` and
``ace tune --retrain`` are built on it.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from ace.runs.layout import CONFIG, SUMMARY

__all__ = ["Run", "run_all", "aggregate", "format_markdown", "run_values"]


class Run(NamedTuple):
    """One row of the table: config file ``path`` trained with ``method`` (None: the config's own)."""

    name: str
    path: Path
    method: str | None


def _train_one(config: str, overrides: list[str], out: str, threads: int) -> dict[str, Any]:
    """One training run in a worker process; resumes a run left without a summary."""
    import torch

    from ace.config.loading import load_config
    from ace.experiment import run

    torch.set_num_threads(threads)
    cfg = load_config(config, overrides)
    holds = Path(out, CONFIG).exists()
    return run(cfg, out, resume=holds)


def _data_seed(path: Path, overrides: list[str]) -> int:
    """The data seed of config ``path`` under ``overrides``; a task without one is refused."""
    from ace.config.loading import load_config

    cfg = load_config(str(path), overrides)
    if not hasattr(cfg.data, "seed"):
        raise ValueError(
            f"{path}: task {cfg.task.name!r} has no data.seed: its data already follow the run seed"
        )
    return int(cfg.data.seed)


def run_all(
    runs: list[Run],
    seeds: int,
    overrides: list[str],
    out: Path,
    jobs: int = 1,
    threads: int = 1,
    train: bool = True,
    data_seeds: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """Train (or read back) every config for seeds 0 .. seeds-1; returns config name -> summaries.

    With ``train=False`` only finished runs are read (the table then counts the seeds it found); with
    ``data_seeds``, seed ``s`` trains on data drawn with ``data.seed`` = the config's + ``s``."""
    tasks: list[tuple[Run, list[str], Path]] = []
    summaries: dict[str, list[dict[str, Any]]] = {r.name: [] for r in runs}
    data_seed = {r.name: _data_seed(r.path, overrides) for r in runs} if data_seeds else {}
    for seed in range(seeds):  # seed-major: a run cut short still has every config at the first seeds
        for r in runs:
            run_dir = out / r.name / f"seed{seed}"
            done = run_dir / SUMMARY
            if done.exists():
                summaries[r.name].append(json.loads(done.read_text()))
            else:
                method = [f"method={r.method}"] if r.method else []
                data = [f"data.seed={data_seed[r.name] + seed}"] if data_seeds else []
                tasks.append((r, [*overrides, *method, f"seed={seed}", *data, "log.progress=false"], run_dir))
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
    from ace.runs.compare import task_metrics
    from ace.runs.reader import best_val_test

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
    from ace.runs.reader import best_val_test

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
