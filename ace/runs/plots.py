"""Plots of one run (gates, multipliers, slacks, deviations, losses) and of several side by side."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ace.runs.reader import RunData

__all__ = ["plot_run", "plot_compare", "ToleranceSweep", "plot_tolerance_sweeps", "plot_scaling"]


def _figure(title: str, ylabel: str):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    fig = Figure(figsize=(7, 4.2), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _scale(ax, values: Iterable[float]) -> None:
    """symlog for signed data, log for positive data spanning over two decades, else linear."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return
    nonzero = [abs(v) for v in values if v != 0]
    if not nonzero:
        return
    top = max(nonzero)
    if min(values) < 0 or (len(nonzero) < len(values) and top / min(nonzero) > 100):
        ax.set_yscale("symlog", linthresh=max(top * 1e-3, 1e-12), linscale=3)
    elif top / min(nonzero) > 100:
        ax.set_yscale("log")


def _save(fig, path: Path, ax) -> Path:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small", loc="best")
    fig.savefig(path)
    return path


def plot_run(run: RunData, out: Path) -> list[Path]:
    """The run's figures as PNGs in ``out``: multipliers, gates, slacks, tolerance vs deviation, loss."""
    made = []
    entries = run.entries()

    def entry_plot(field: str, file: str, title: str, ylabel: str) -> None:
        fig, ax = _figure(title, ylabel)
        values = []
        for entry in entries:
            steps, ys = run.series(f"constraint/{entry}/{field}")
            if steps:
                ax.plot(steps, ys, label=entry)
                values += ys
        if values:
            ax.axhline(0.0, color="black", lw=0.6)
            _scale(ax, values)
            made.append(_save(fig, out / file, ax))

    entry_plot("multiplier", "multipliers.png", "Multipliers lambda (prices of the constraints)", "lambda")
    entry_plot("slack", "slacks.png", "Slacks u (tolerance the model bought)", "u")

    gate_names = list(run.gates())
    if gate_names:
        fig, ax = _figure("Gates gamma (0 = exactly equivariant layer)", "gamma")
        values = []
        for name in gate_names:
            steps, ys = run.series(f"gate/{name}")
            ax.plot(steps, ys, label=name)
            values += ys
        ax.axhline(0.0, color="black", lw=0.6)
        _scale(ax, values)
        made.append(_save(fig, out / "gates.png", ax))

    fig, ax = _figure("Tolerance against measured deviation", "deviation / |gate|")
    values = []
    for i, entry in enumerate(entries):
        color = f"C{i % 10}"
        kind = "gate" if "gate" in entries[entry] else "deviation"
        steps, ys = run.series(f"constraint/{entry}/{kind}")
        ys = [abs(y) for y in ys]
        ax.plot(steps, ys, color=color, label=f"{entry} measured")
        tsteps, tol = run.series(f"constraint/{entry}/tolerance")
        ax.plot(tsteps, tol, color=color, ls="--", label=f"{entry} tolerance eps")
        values += ys + tol
        ssteps, slack = run.series(f"constraint/{entry}/slack")
        if ssteps:  # resilient: the bound the model actually faced
            bound = [t + u for t, u in zip(tol, slack)]
            ax.plot(ssteps, bound, color=color, ls=":", label=f"{entry} eps + slack")
            values += bound
    relative = (run.config.get("constraint") or {}).get("relative", False)
    steps, ys = run.series("val/relative_deviation" if relative else "val/deviation", "val")
    if steps:
        label = "val relative deviation D_rel" if relative else "val deviation D"
        ax.plot(steps, ys, "ko:", ms=4, label=f"{label} (relaxed model)")
        values += ys
    if values:
        _scale(ax, values)
        made.append(_save(fig, out / "tolerance.png", ax))

    fig, ax = _figure("Loss", "loss")
    values = []
    for key, style, label in (("loss", "-", "train loss"), ("lagrangian", "-", "train Lagrangian")):
        steps, ys = run.series(key)
        if steps:
            ax.plot(steps, ys, style, label=label, alpha=0.8)
            values += ys
    for key, style, label in (
        ("val/loss", "o-", "val loss (relaxed)"),
        ("val/eq/loss", "s--", "val loss (f_eq)"),
    ):
        steps, ys = run.series(key, "val")
        if steps:
            ax.plot(steps, ys, style, ms=4, label=label)
            values += ys
    if values:
        _scale(ax, values)
        made.append(_save(fig, out / "loss.png", ax))
    return made


def plot_compare(runs: Sequence[RunData], labels: Sequence[str], out: Path) -> list[Path]:
    made = []
    fig, ax = _figure("Loss (solid: train, markers: validation)", "loss")
    values = []
    for i, (label, r) in enumerate(zip(labels, runs)):
        steps, ys = r.series("loss")
        ax.plot(steps, ys, color=f"C{i % 10}", alpha=0.7, label=f"{label} train")
        vsteps, vys = r.series("val/loss", "val")
        ax.plot(vsteps, vys, "o--", color=f"C{i % 10}", ms=4, label=f"{label} val")
        values += ys + vys
    if values:
        _scale(ax, values)
        made.append(_save(fig, out / "compare_loss.png", ax))
    fig, ax = _figure("Measured equivariance deviation D on validation", "D")
    values = []
    for i, (label, r) in enumerate(zip(labels, runs)):
        steps, ys = r.series("val/deviation", "val")
        if steps:
            ax.plot(steps, ys, "o-", color=f"C{i % 10}", ms=4, label=label)
            values += ys
    if values:
        _scale(ax, values)
        made.append(_save(fig, out / "compare_deviation.png", ax))
    return made


@dataclass
class ToleranceSweep:
    """One data set's runs under a fixed final deviation tolerance: ``metrics[i]`` at ``tolerances[i]``;
    ``free`` the unconstrained model's metric, ``strict`` the exactly equivariant one's; ``chosen_*`` what
    resilient training settled on by itself (its measured deviation D, its slack u and its metric);
    ``asymmetry`` the data's symmetrisation gap."""

    label: str
    asymmetry: float
    tolerances: Sequence[float]
    metrics: Sequence[float]
    free: float | None = None
    strict: float | None = None
    chosen_deviation: float | None = None
    chosen_slack: float | None = None
    chosen_metric: float | None = None

    @property
    def best_tolerance(self) -> float:
        """The tolerance of the lowest metric, 0 when the strict model is lower still (NaN: no runs)."""
        best = min(zip(self.metrics, self.tolerances), default=(math.inf, math.nan))
        return 0.0 if self.strict is not None and self.strict < best[0] else best[1]


def plot_tolerance_sweeps(
    sweeps: Sequence[ToleranceSweep], out: Path, metric: str = "test metric"
) -> list[Path]:
    """Two PNGs in ``out``: ``metric`` against the tolerance per data set (dashed: unconstrained; dotted:
    strict; star: resilient at its measured deviation), and the best tolerance and resilient's choice
    against the data's asymmetry (does the best model symmetry follow the data's?)."""
    fig, ax = _figure(f"{metric} against the deviation tolerance", metric)
    ax.set_xlabel("final deviation tolerance eps (star: resilient's measured D)")
    ax.set_xscale("log")
    for i, s in enumerate(sweeps):
        color = f"C{i % 10}"
        ax.plot(s.tolerances, s.metrics, "o-", color=color, label=s.label)
        if s.free is not None:
            ax.axhline(s.free, color=color, ls="--", lw=1, alpha=0.7)
        if s.strict is not None:
            ax.axhline(s.strict, color=color, ls=":", lw=1, alpha=0.7)
        if s.chosen_deviation is not None and s.chosen_metric is not None:
            ax.plot([s.chosen_deviation], [s.chosen_metric], "*", color=color, ms=14, mec="k")
    _scale(ax, [m for s in sweeps for m in [*s.metrics, s.free, s.strict, s.chosen_metric] if m is not None])
    made = [_save(fig, out / "tolerance_sweep.png", ax)]

    fig, ax = _figure("Model symmetry against data symmetry", "deviation")
    ax.set_xlabel("data asymmetry: symmetrisation gap of the unconstrained model")
    gaps = [s.asymmetry for s in sweeps]
    ax.set_xscale("symlog", linthresh=max(min((abs(g) for g in gaps if g), default=1e-6), 1e-12))
    plotted = [s.best_tolerance for s in sweeps]
    ax.plot(gaps, plotted, "o-", label="best tolerance of the sweep (0: strict)")
    for key, label, marker in (
        ("chosen_deviation", "resilient: measured D", "*"),
        ("chosen_slack", "resilient: slack u", "s"),
    ):
        points = [(s.asymmetry, getattr(s, key)) for s in sweeps if getattr(s, key) is not None]
        if points:
            ax.plot(*zip(*points), marker, ls=":", ms=9, label=label)
            plotted += [y for _, y in points]
    _scale(ax, plotted)
    made.append(_save(fig, out / "tolerance_vs_asymmetry.png", ax))
    return made


def plot_scaling(
    curves: dict[str, tuple[Sequence[float], Sequence[float], Any]], path: Path, metric: str = "test error"
) -> Path:
    """Log-log ``metric`` against the training-set size: per label, the runs ``(sizes, errors)`` as points and
    the fitted :class:`ace.diagnostics.PowerLaw` (or None) as a line labelled with its exponent."""
    fig, ax = _figure(f"{metric} against training-set size", metric)
    ax.set_xlabel("training-set size n")
    ax.set_xscale("log")
    ax.set_yscale("log")
    for i, (label, (sizes, errors, fit)) in enumerate(curves.items()):
        color = f"C{i % 10}"
        ax.plot(sizes, errors, "o", color=color, alpha=0.8)
        if fit is not None and sizes:
            ends = [min(sizes), max(sizes)]
            line = [fit.C * n**-fit.alpha for n in ends]
            text = f"{label}: alpha {fit.alpha:.2f} [{fit.low:.2f}, {fit.high:.2f}]"
            ax.plot(ends, line, "-", color=color, label=text)
        else:
            ax.plot([], [], "o", color=color, label=label)
    return _save(fig, path, ax)
