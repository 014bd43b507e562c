"""What ``ace tune`` leaves in its folder: ``trials.csv``, ``best.yaml``, ``tune.json`` and plots."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from ace.config.loading import dump_config, load_config
from ace.runs.metrics import write_json

__all__ = ["write_report", "ranked", "retrain", "format_report"]


def _feasible(trial) -> bool:
    return all(c <= 0 for c in trial.user_attrs.get("constraint", (0.0,)))


def ranked(study, settings) -> list:
    """The complete, feasible trials, best first (on the first objective: the validation metric)."""
    maximize = study.directions[0].name == "MAXIMIZE"
    done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE" and _feasible(t)]
    return sorted(done, key=lambda t: -t.values[0] if maximize else t.values[0])


def _label(settings, metric: str) -> str:
    """The objective's key in a validation record: ``val/<metric>``, ``val/eq/<metric>`` for f_eq."""
    return f"val/{'eq/' if settings.variant == 'eq' else ''}{metric}"


def _write_csv(path: Path, study, label: str) -> None:
    trials = study.get_trials(deepcopy=False)
    params = sorted({k for t in trials for k in t.params})
    attrs = sorted({k for t in trials for k in t.user_attrs if k not in ("host", "run", "constraint")})
    values = [label] + (["val/deviation (objective)"] if len(study.directions) > 1 else [])
    with path.open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["trial", "state", *values, *params, *attrs, "feasible", "run"])
        for t in trials:
            scores = list(t.values) if t.values else [""] * len(values)
            out.writerow(
                [t.number, t.state.name.lower(), *scores]
                + [t.params.get(k, "") for k in params]
                + [t.user_attrs.get(k, "") for k in attrs]
                + [_feasible(t), t.user_attrs.get("run", "")]
            )


def _plots(study, out: Path, label: str) -> list[str]:
    """Optimisation history, parameter importances and (two objectives) the Pareto front, as PNG files;
    returns what could not be drawn and why."""
    import warnings

    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure
    from optuna.visualization import matplotlib as vis

    skipped = []
    single = len(study.directions) == 1
    target = None if single else (lambda t: t.values[0])
    name = None if single else "validation metric"
    plots = {
        "history.png": lambda: vis.plot_optimization_history(
            study, target=target, target_name=name or "Objective"
        ),
        "importances.png": lambda: vis.plot_param_importances(
            study, target=target, target_name=name or "Objective"
        ),
    }
    if not single:
        plots["pareto.png"] = lambda: vis.plot_pareto_front(
            study, target_names=["validation metric", "deviation"]
        )
    for file, draw in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                axes = draw()
            first = axes.flat[0] if hasattr(axes, "flat") else axes
            if file == "history.png":  # Optuna labels a single objective "Objective" whatever its name
                first.set_ylabel(name or label)
            figure = first.get_figure()
            assert isinstance(figure, Figure), "Optuna draws each plot on a figure of its own"
            figure.set_size_inches(7, 4.5)
            figure.tight_layout()
            figure.savefig(out / file, dpi=110)
            plt.close(figure)
        except Exception as err:  # noqa: BLE001 - a plot that needs more trials is skipped, said so
            skipped.append(f"{file}: {err}")
    return skipped


def write_report(study, settings, params, base, metric: str) -> dict[str, Any]:
    """Write ``trials.csv``, ``best.yaml`` (a config ``ace train`` runs), ``tune.json`` and the plots into
    ``settings.out``; return ``tune.json``'s content."""
    from ace.tune.search import trial_overrides

    out = Path(settings.out)
    label = _label(settings, metric)
    _write_csv(out / "trials.csv", study, label)
    states: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    best = ranked(study, settings)
    report: dict[str, Any] = {"study": settings.name, "metric": label, "trials": states}
    if best:
        top = best[0]
        overrides = trial_overrides(settings, params, base, top.params)
        text = dump_config(load_config(settings.config, overrides))
        command = " ".join(["ace train", settings.config, *overrides])
        (out / "best.yaml").write_text(
            f"# ace tune: trial {top.number} of study {settings.name}\n# {command}\n{text}"
        )
        report["best"] = {
            "trial": top.number,
            "value": top.values[0],
            "params": top.params,
            "overrides": overrides,
            "test": {k: v for k, v in top.user_attrs.items() if k.startswith("test/")},
            "run": top.user_attrs.get("run"),
        }
    report["skipped_plots"] = _plots(study, out, label)
    write_json(out / "tune.json", report)
    return report


def format_report(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    counts = ", ".join(f"{n} {state}" for state, n in sorted(report["trials"].items()))
    lines = [f"study {report['study']}: {counts}"]
    best = report.get("best")
    if best:
        shown = {
            k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
            for k, v in best["params"].items()
        }
        lines.append(f"best: trial {best['trial']}, {report['metric']} = {best['value']:.4g}, {shown}")
        lines.append(f"its run: {best['run']}; its config: best.yaml (ace train best.yaml)")
    else:
        lines.append("no complete trial meets the constraints yet")
    if "retrain" in report:
        lines += [
            "",
            "retrained over seeds (test at the best validation step; OUT/retrain/table.md):",
            report["retrain"],
        ]
    return "\n".join(lines)


def retrain(study, settings, params, base, top: int, seeds: int, jobs: int = 1) -> str:
    """Train the config as written and the ``top`` best trials' configs for ``seeds`` seeds each (through
    :func:`ace.seeds.run_all`, as ``benchmarks/compare.py`` does) into ``OUT/retrain``; returns the table,
    also written to ``OUT/retrain/table.md``: test at the best validation step, mean ± std over seeds."""
    from ace.seeds import Run, aggregate, format_markdown, run_all
    from ace.tune.search import trial_overrides

    folder = Path(settings.out) / "retrain"
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    chosen = {"as_written": list(settings.overrides)}
    for rank, trial in enumerate(ranked(study, settings)[:top], 1):
        chosen[f"top{rank}_trial{trial.number}"] = trial_overrides(settings, params, base, trial.params)
    runs = []
    for name, overrides in chosen.items():
        path = folder / "configs" / f"{name}.yaml"
        path.write_text(dump_config(load_config(settings.config, overrides)), encoding="utf-8")
        runs.append(Run(name, path, None))
    summaries = run_all(runs, seeds, [], folder, jobs=jobs, threads=settings.threads)
    table = format_markdown(*aggregate(summaries))
    (folder / "table.md").write_text(table + "\n", encoding="utf-8")
    return table
