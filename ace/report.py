"""What a finished run says about the equivariance/fit balance: reports, comparisons, sweeps, exports.

Everything here reads a run directory (``config.yaml``, ``metrics.jsonl``, ``summary.json``,
``checkpoints/last.pt``) and never changes what training wrote.

Balance
-------
A finished run's balance is the final model's (``summary.json``: after the last update, one gate value
everywhere); an unfinished run's is its last training record's. One row per constraint entry (one per gate
for gate constraints), plus one per gated layer that no gate constraint covers.

Verdicts
--------
The verdict reads the **measured** relative deviation ``D_rel``, never the gate: a gate bounds the gate, not
the branch (``gamma f_neq`` is invariant under ``gamma -> gamma/a, f_neq -> a f_neq``). For a gated layer
``D_rel`` is that layer's (the model with only its branch enabled, ``val/relative_deviation/<layer>`` on the
final validation pass); for a deviation constraint it is the whole model's (``val/relative_deviation``):

* **symmetric (measured)**: ``D_rel <= SYMMETRIC`` (1e-5: the non-equivariant part carries at most 1e-5 of
  the output's mean squared norm);
* **breaks symmetry (measured rel. deviation X)**: ``D_rel > SYMMETRIC``;
* **not measured**: no validation pass measured it (no symmetry, no validation set, or an older run).

The report then names the layer that gives up the most symmetry (largest ``D_rel``) when any exceeds
``SYMMETRIC``. A second column gives the constraint's state, from value ``g`` (``|gamma|``, the signed gate
for equalities, or the deviation D), tolerance ``eps``, slack ``u`` and violation ``v = g - eps - u``,
checked in this order:

* **kept slack**: a resilient constraint whose slack ``u > SLACK_ZERO`` (1e-3) is in use (``|g| > eps``);
* **constraint active**: an equality, or ``v > -BAND`` with ``BAND = ACTIVE_BAND * (eps + u) + ACTIVE_FLOOR``
  (within 10% of its bound, plus 1e-3): the constraint binds (or is violated, said so: ``|v| > BAND``);
* **constraint inactive**: satisfied with room to spare; its multiplier should decay to 0.

Prices
------
At a primal-dual solution, ``lambda_i = -dP*/d eps_i``: giving constraint i ``delta`` more tolerance lowers
the best achievable training loss by about ``lambda_i * delta``. The price of an active entry is
``|lambda_i|``, of an inactive one 0 (its multiplier is a transient). The step ``delta`` is
``DELTA_FRACTION`` (0.1) of the constraint's natural scale: of the gate's initial value (``relax.gate_init``,
1) for gate constraints, of the tolerance start (``summary["tolerance_starts"]``, else the measured
deviation) for deviation constraints. A price is **material** when ``price * delta >= MATERIAL * L``
(``MATERIAL`` = 0.1, ``L`` the final training loss): the relaxation would gain at least 10% of the loss. The
report names the entry with the largest material price as the one to relax, and otherwise says that no
multiplier is material. It is a first-order estimate, only as good as the run's convergence; fixed penalty
weights (method ``penalty``) are not prices.

Test at the best validation step
--------------------------------
``summary["selected"]`` holds, per variant (the model as trained, and f_eq for gated models), the test metrics
at that variant's own best validation step (the papers' protocol). The report's metrics table, ``ace compare``
and ``benchmarks/compare.py`` show them next to the final ones; a summary without ``selected`` (older runs)
falls back to the final values, marked.
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .loggers import format_table, read_metrics

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "report",
    "compare",
    "sweep",
    "export",
    "parse_grid",
    "RunData",
    "verdict",
    "constraint_state",
    "is_active",
    "best_val_test",
    "task_metrics",
    "ExportError",
]

#: a layer (or model) whose measured relative deviation is at most this is symmetric.
SYMMETRIC = 1e-5  # measured per layer: symmetric data <= 2e-6 (toy), <= 1e-9 (N-body); broken 2e-5 .. 0.25
#: a slack larger than this is "kept".
SLACK_ZERO = 1e-3
#: a constraint is active when its violation exceeds ``-(ACTIVE_BAND * (eps + u) + ACTIVE_FLOOR)``.
ACTIVE_BAND = 0.1
ACTIVE_FLOOR = 1e-3
#: prices are quoted for ``delta`` = this fraction of the gate's initial value or of the tolerance start.
DELTA_FRACTION = 0.1
#: a price is material when ``price * delta >= MATERIAL * final training loss``.
MATERIAL = 0.1
#: footnote marker of values that fall back to the final step (a summary without ``selected``).
FALLBACK = "†"


class ExportError(ValueError):
    """A run whose model cannot be exported the way asked."""


# --------------------------------------------------------------------------- reading a run


class RunData:
    """A run directory read once: config, train/val/test records, summary (None while unfinished)."""

    def __init__(self, run_dir: str | Path) -> None:
        from .experiment import RunDirError

        self.path = Path(run_dir)
        metrics = self.path / "metrics.jsonl"
        if not self.path.is_dir() or not metrics.exists():
            raise RunDirError(
                f"{run_dir} is not a run directory (no metrics.jsonl); "
                f"make one with `ace train CONFIG --out {run_dir}`"
            )
        config = self.path / "config.yaml"
        self.config: dict = (
            yaml.safe_load(config.read_text(encoding="utf-8")) if config.exists() else None
        ) or {}
        records = read_metrics(metrics)
        self.train = [r for r in records if "loss" in r]
        self.evals = {
            s: [r for r in records if any(k.startswith(s + "/") for k in r)] for s in ("val", "test")
        }
        summary = self.path / "summary.json"
        self.summary: dict | None = (
            json.loads(summary.read_text(encoding="utf-8")) if summary.exists() else None
        )

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def method(self) -> str:
        return str(self.config.get("method", "?"))

    @property
    def final(self) -> dict[str, Any]:
        """The last training record (the one ``summary.json`` calls ``final``)."""
        return self.train[-1] if self.train else {}

    def last(self, split: str) -> dict[str, Any]:
        return self.evals[split][-1] if self.evals[split] else {}

    def entries(self) -> dict[str, dict[str, float]]:
        """``{entry: {tolerance, gate|deviation, violation, multiplier[, slack]}}`` of the last record."""
        table: dict[str, dict[str, float]] = {}
        for key, value in self.final.items():
            if key.startswith("constraint/"):
                entry, _, field = key.removeprefix("constraint/").rpartition("/")
                table.setdefault(entry, {})[field] = value
        return table

    def gates(self) -> dict[str, float]:
        return {k.removeprefix("gate/"): v for k, v in self.final.items() if k.startswith("gate/")}

    def series(self, key: str, split: str | None = None) -> tuple[list[int], list[float]]:
        """``(steps, values)`` of ``key`` over the training (or ``split``) records that have it."""
        records = self.train if split is None else self.evals[split]
        pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        return [p[0] for p in pairs], [float(p[1]) for p in pairs]

    def balance(self) -> tuple[int, dict[str, dict[str, float]], bool]:
        """``(step, entries, finished)``: the final model's constraint entries from ``summary.json`` (after
        the last update) or, while the run is unfinished, those of the last training record."""
        if self.summary is not None and "constraints" in self.summary:
            return self.summary["steps"], self.summary["constraints"], True
        return self.final.get("step", 0), self.entries(), False

    def layers(self) -> dict[str, dict[str, float]]:
        """Per gated layer: ``gate`` [, ``multiplier``, ``slack``] and, when measured, ``deviation`` and
        ``relative_deviation`` with only its branch enabled (``summary["layers"]``; else the last records)."""
        if self.summary is not None and "layers" in self.summary:
            return self.summary["layers"]
        gates = (self.summary or {}).get("gates") or self.gates()
        val = self.last("val")
        return {
            name: {
                "gate": gate,
                **{
                    k: val[f"val/{k}/{name}"]
                    for k in ("deviation", "relative_deviation")
                    if f"val/{k}/{name}" in val
                },
            }
            for name, gate in gates.items()
        }

    def relative_deviation(self) -> float | None:
        """The whole model's measured relative deviation on the final validation pass."""
        return ((self.summary or {}).get("val") or self.last("val")).get("val/relative_deviation")


def _band(row: dict[str, float]) -> float:
    return ACTIVE_BAND * (row.get("tolerance", 0.0) + row.get("slack", 0.0)) + ACTIVE_FLOOR


def is_active(row: dict[str, float], equality: bool = False) -> bool:
    """Whether an entry binds: an equality, or violation ``> -(ACTIVE_BAND * (eps + u) + ACTIVE_FLOOR)``."""
    return equality or row["violation"] > -_band(row)


def verdict(relative_deviation: float | None) -> str:
    """What the measured relative deviation says about symmetry (thresholds in the module docstring)."""
    if relative_deviation is None or math.isnan(relative_deviation):
        return "not measured"
    if relative_deviation <= SYMMETRIC:
        return "symmetric (measured)"
    return f"breaks symmetry (measured rel. deviation {relative_deviation:.2g})"


def constraint_state(row: dict[str, float], equality: bool = False) -> str:
    """Whether one constraint entry keeps slack, binds or has room to spare (module docstring)."""
    value, slack = row.get("gate", row.get("deviation")), row.get("slack")
    if slack is not None and slack > SLACK_ZERO and abs(value) > row.get("tolerance", 0.0):
        return "kept slack"
    if is_active(row, equality):
        return "constraint active" + (" (violated)" if abs(row["violation"]) > _band(row) else "")
    return "constraint inactive"


def best_val_test(summary: dict[str, Any]) -> dict[str, Any]:
    """Test metrics at each variant's best validation step, from ``summary["selected"]``.

    Returns:
        ``{"model": {metric: value}, "eq": {metric: value}, "step": s, "eq_step": s, "selected": bool}``
        with metrics unprefixed (``"mse"``, ``"deviation"``, ...); f_eq is the model itself when the run has
        no gates. A summary without ``selected`` (older runs, or no validation set) gives the final test
        values instead, with ``selected`` False and no steps.
    """
    selected = summary.get("selected") or {}
    if "model" in selected:
        model, eq = selected["model"], selected.get("eq", selected["model"])
        return {
            "model": model.get("test", {}),
            "eq": eq.get("test", {}),
            "step": model["step"],
            "eq_step": eq["step"],
            "selected": True,
        }
    test = {k.removeprefix("test/"): v for k, v in summary.get("test", {}).items() if k.startswith("test/")}
    model = {k: v for k, v in test.items() if not k.startswith("eq/")}
    eq = {k.removeprefix("eq/"): v for k, v in test.items() if k.startswith("eq/")} or model
    return {"model": model, "eq": eq, "step": None, "eq_step": None, "selected": False}


def _per_layer(metric: str) -> bool:
    """Whether an unprefixed metric name is a per-layer measurement (``deviation/<layer>``)."""
    return "/" in metric.removeprefix("eq/")


# --------------------------------------------------------------------------- report


def report(run_dir: str | Path, plots: bool = True) -> str:
    """Write ``RUN/report.md`` (and PNG plots in ``RUN/``) for a run and return the markdown.

    Sections: the balance table (tolerance, gate or deviation, violation, multiplier, slack, measured relative
    deviation, verdict and constraint state per constraint entry and gated layer), the multipliers read as
    prices, f_eq against the relaxed model (last validation and test records, and test at the best
    validation step), the best validation values, and the plots.
    """
    run = RunData(run_dir)
    lines = [f"# Run report: {run.path}", "", _header(run), ""]
    lines += _balance(run)
    lines += _gap(run)
    lines += _best(run)
    if plots:
        made = plot_run(run, run.path)
        if made:
            lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in made] + [""]
    text = "\n".join(lines)
    (run.path / "report.md").write_text(text, encoding="utf-8")
    return text


def _is_equality(run: RunData) -> bool:
    return run.method == "ace" and (run.config.get("constraint") or {}).get("kind", "gate") == "gate"


def _header(run: RunData) -> str:
    task = (run.config.get("task") or {}).get("name", "?")
    parts = [f"method `{run.method}`", f"task `{task}`"]
    if run.summary is not None:
        parts += [f"{run.summary['steps']} steps", f"{run.summary['epochs']} epochs"]
        parts.append(f"wall time {run.summary['wall_time']:.4g} s")
    else:
        parts.append(f"unfinished (no summary.json; last record at step {run.final.get('step', 0)})")
    return ", ".join(parts) + "."


def _balance(run: RunData) -> list[str]:
    """The balance table, the layer giving up the most symmetry, and the prices."""
    step, entries, finished = run.balance()
    layers = run.layers()
    if not entries and not layers:
        return ["No constraints and no gates: nothing to balance.", ""]
    equality = _is_equality(run)
    rows, covered = [], set()
    for entry, row in entries.items():
        if "gate" in row:
            layer = entry.split(".", 1)[-1]
            covered.add(layer)
            measured = layers.get(layer, {}).get("relative_deviation")
        else:
            measured = run.relative_deviation()
        kind = "gate" if "gate" in row else "deviation"
        rows.append(
            [
                entry,
                row.get("tolerance"),
                row.get(kind),
                row.get("violation"),
                row.get("multiplier"),
                row.get("slack"),
                measured,
                verdict(measured),
                constraint_state(row, equality),
            ]
        )
    for name, row in layers.items():
        if name not in covered:
            measured = row.get("relative_deviation")
            rows.append(
                [f"gate {name}", None, row["gate"], *[None] * 3, measured, verdict(measured), "no constraint"]
            )
    header = [
        "constraint",
        "tolerance",
        "deviation / gate",
        "violation",
        "multiplier",
        "slack",
        "measured rel. deviation",
        "verdict",
        "constraint state",
    ]
    when = "after the last update" if finished else "last logged training step; the run is unfinished"
    lines = [
        f"## Balance at step {step} ({when})",
        "",
        "measured rel. deviation: of the model with only that layer's branch enabled (gate rows), or of the "
        "whole model (deviation constraints), on the final validation pass, relative to mean ||f(x)||^2. "
        f"The verdict reads it (symmetric when <= {SYMMETRIC:g}), never the gate.",
        "",
        format_table(header, rows),
        "",
    ]
    measured = {
        n: r["relative_deviation"] for n, r in layers.items() if r.get("relative_deviation") is not None
    }
    worst = max(measured, key=measured.get, default=None)
    if worst is not None and measured[worst] > SYMMETRIC:
        lines += [
            f"`{worst}` gives up the most symmetry: with only its branch enabled the measured relative "
            f"deviation is {measured[worst]:.3g}.",
            "",
        ]
    elif measured and len(measured) == len(layers):
        lines += [
            f"Every gated layer is symmetric as measured: relative deviation <= {SYMMETRIC:g} with its "
            "branch alone.",
            "",
        ]
    return lines + (_prices(run, entries, equality) if entries else [])


def _deltas(run: RunData, entries: dict[str, dict[str, float]]) -> dict[str, float]:
    """The tolerance step each price is quoted for (module docstring)."""
    starts = (run.summary or {}).get("tolerance_starts") or {}
    gate_init = float((run.config.get("relax") or {}).get("gate_init", 1.0))
    return {
        entry: DELTA_FRACTION * abs(gate_init if "gate" in row else starts.get(entry, row["deviation"]))
        for entry, row in entries.items()
    }


def _prices(run: RunData, entries: dict[str, dict[str, float]], equality: bool) -> list[str]:
    if run.method == "penalty":
        return ["The multipliers are fixed penalty weights (method `penalty`), not learned prices.", ""]
    loss = run.final.get("loss", math.nan)
    deltas = _deltas(run, entries)
    prices = {e: abs(row["multiplier"]) if is_active(row, equality) else 0.0 for e, row in entries.items()}
    falls = {e: prices[e] * deltas[e] for e in entries}
    material = {e: falls[e] > 0 and falls[e] >= MATERIAL * abs(loss) for e in entries}
    ranked = sorted(entries, key=lambda e: -prices[e])
    rows = [
        [rank, e, entries[e]["multiplier"], prices[e], deltas[e], falls[e], "yes" if material[e] else "no"]
        for rank, e in enumerate(ranked, 1)
    ]
    header = [
        "rank",
        "constraint",
        "multiplier",
        "price",
        "delta",
        "loss fall for +delta",
        "material",
    ]
    lines = [
        "## Multipliers as prices",
        "",
        "lambda = -dP*/d eps: the estimated fall in the best training loss per unit of tolerance given to "
        "a constraint (first order, as good as the run's convergence). An inactive constraint has price 0: "
        "its remaining multiplier is a transient that dual ascent is still draining. delta is a tenth of the "
        "gate's initial value (gate constraints) or of the tolerance start (deviation constraints); a price "
        f"is material when price * delta >= {MATERIAL:g} x the final training loss ({loss:.4g}).",
        "",
        format_table(header, rows),
        "",
    ]
    chosen = [e for e in ranked if material[e]]
    if chosen:
        top = chosen[0]
        lines.append(
            f"Relaxing `{top}` would gain most: to first order, {deltas[top]:.3g} more tolerance lowers the "
            f"training loss by about {falls[top]:.3g} (final training loss {loss:.4g})."
        )
        if equality and entries[top]["multiplier"] < 0:
            lines.append(
                "(A negative multiplier of an equality: the gain comes from letting the gate go negative.)"
            )
    elif prices[ranked[0]] > 0:
        top = ranked[0]
        lines.append(
            f"No multiplier is material: all prices are negligible. The largest, `{top}`'s, would lower the "
            f"training loss by about {falls[top]:.3g} for {deltas[top]:.3g} more tolerance, under "
            f"{100 * MATERIAL:g}% of the final training loss."
        )
    else:
        lines.append(
            "No multiplier is material: no constraint binds at the end, so every price is 0 and relaxing "
            "any of them gains nothing to first order."
        )
    return [*lines, ""]


def _versus(value: float, eq: float | None) -> list[Any]:
    """``[value, eq, eq - value, relative]`` cells of one f_eq-against-the-model row."""
    gap = None if eq is None else eq - value
    pct = None if eq is None or value == 0 else 100 * (eq - value) / abs(value)
    rel = None if pct is None else f"{pct:+.0f}%" if abs(pct) >= 100 else f"{pct:+.3g}%"
    return [value, eq, gap, rel]


def _gap(run: RunData) -> list[str]:
    rows = []
    for split in ("val", "test"):
        record = run.last(split)
        prefix = split + "/"
        for key, value in record.items():
            metric = key.removeprefix(prefix)
            if key.startswith(prefix) and not metric.startswith("eq/") and not _per_layer(metric):
                rows.append(
                    [
                        f"{split} (final, step {record['step']})",
                        metric,
                        *_versus(value, record.get(f"{prefix}eq/{metric}")),
                    ]
                )
    gated = bool(run.layers())
    best = best_val_test(run.summary) if run.summary is not None else None
    if best is not None and best["selected"]:
        label = f"test (best val, step {best['step']}" + (f"; f_eq step {best['eq_step']})" if gated else ")")
        for metric, value in best["model"].items():
            if not _per_layer(metric):
                rows.append([label, metric, *_versus(value, best["eq"].get(metric) if gated else None)])
    if not rows:
        return []
    header = ["split", "metric", "relaxed", "f_eq", "f_eq - relaxed", "relative"]
    note = (
        "f_eq is the model with every gated branch dropped (what `ace export --equivariant` saves)."
        if gated
        else "The model has no gates, so f_eq is not defined; deviations are measured on the model itself."
    )
    if best is not None and best["selected"]:
        note += (
            " test (best val): the test metrics at the best validation step, each variant selected on its "
            "own validation metric (the papers' protocol)."
        )
    elif run.summary is not None:
        note += " No test at the best validation step in summary.json (an older run, or no validation set)."
    return ["## f_eq against the relaxed model", "", note, "", format_table(header, rows), ""]


def _best(run: RunData) -> list[str]:
    if not run.summary or not run.summary.get("best"):
        return []
    rows = [
        [key, best["value"], best["step"]]
        for key, best in run.summary["best"].items()
        if not _per_layer(key.partition("/")[2])
    ]
    return ["## Best validation values", "", format_table(["metric", "best", "step"], rows), ""]


# --------------------------------------------------------------------------- plots


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


# --------------------------------------------------------------------------- compare


def _labels(runs: Sequence[RunData]) -> list[str]:
    names = [r.name for r in runs]
    return names if len(set(names)) == len(names) else [str(r.path) for r in runs]


def _compare_columns(runs: Sequence[RunData]) -> list[str]:
    """Final val and test keys in first-seen order, relaxed before f_eq."""
    keys: dict[str, None] = {}
    for split in ("val", "test"):
        for r in runs:
            for key in r.last(split):
                if key.startswith(split + "/"):
                    keys.setdefault(key, None)
    return sorted(keys, key=lambda k: (k.startswith("test/"), "/eq/" in k))


def task_metrics(names: Iterable[str]) -> list[str]:
    """The task metrics (``mse``, ``accuracy``, ...) among unprefixed metric names, in first-seen order: not
    the loss, the deviations, f_eq's or per-layer ones; ``["loss"]`` when nothing else is left."""
    skip = ("loss", "deviation", "relative_deviation")
    found = [
        m for m in dict.fromkeys(names) if m not in skip and not m.startswith("eq/") and not _per_layer(m)
    ]
    return found or ["loss"]


def compare(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> str:
    """Side-by-side table of runs: test at the best validation step, final metrics, best validation values.

    The markdown table shows, per run, the step each variant was selected at (model / f_eq), the test task
    metrics there for the model and f_eq (f_eq = the model for runs without gates; marked with a dagger and
    taken from the final step for summaries without ``selected``), the final validation and test values
    and the best validation loss. Returns it (with the dagger's footnote when one is used). With ``out``, also
    writes ``compare.md``, ``compare.csv`` (every value) and the overlaid curves ``compare_loss.png`` and
    ``compare_deviation.png`` there.
    """
    runs = [RunData(d) for d in run_dirs]
    if not runs:
        raise ValueError("compare needs at least one run directory")
    labels = _labels(runs)
    chosen = [best_val_test(r.summary or {"test": r.last("test")}) for r in runs]
    every = [m for m in dict.fromkeys(m for c in chosen for m in c["model"]) if not _per_layer(m)]
    finals = _compare_columns(runs)
    bests = [k for k in dict.fromkeys(k for r in runs for k in (r.summary or {}).get("best", {}))]
    header = [
        "run",
        "method",
        "steps",
        "wall time (s)",
        "selected",
        "best val step",
        "f_eq best val step",
        *(f"test/{m} at best val" for m in every),
        *(f"test/eq/{m} at best val" for m in every),
        *finals,
        *(f"best {k}" for k in bests),
    ]
    rows = []
    for label, r, c in zip(labels, runs, chosen):
        summary = r.summary or {}
        values = {**r.last("val"), **r.last("test")}
        rows.append(
            [
                label,
                r.method,
                summary.get("steps", r.final.get("step")),
                summary.get("wall_time"),
                c["selected"],
                c["step"],
                c["eq_step"],
                *(c["model"].get(m) for m in every),
                *(c["eq"].get(m) for m in every),
                *(values.get(k) for k in finals),
                *((summary.get("best", {}).get(k) or {}).get("value") for k in bests),
            ]
        )
    table = _compare_markdown(runs, labels, chosen, finals)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
        (out / "compare.csv").write_text(buffer.getvalue(), encoding="utf-8")
        made = _plot_compare(runs, labels, out)
        text = "\n".join(["# Comparison", "", table, "", *(f"![{p.stem}]({p.name})" for p in made), ""])
        (out / "compare.md").write_text(text, encoding="utf-8")
    return table


def _compare_markdown(
    runs: Sequence[RunData], labels: Sequence[str], chosen: Sequence[dict[str, Any]], finals: Sequence[str]
) -> str:
    """The markdown of :func:`compare`: test at best validation first, then final values (the CSV has all)."""
    metrics = task_metrics(m for c in chosen for m in c["model"])
    finals = [
        k
        for k in finals
        if k == "val/eq/loss"
        or not ("/eq/" in k or "relative_deviation" in k or _per_layer(k.partition("/")[2]))
    ]
    header = [
        "run",
        "method",
        "steps",
        "wall time (s)",
        "best val step (model / f_eq)",
        *(h for m in metrics for h in (f"test {m} (best val)", f"test {m} f_eq (best val)")),
        *(f"{k} (final)" for k in finals),
        "best val/loss",
    ]
    rows = []
    for label, r, c in zip(labels, runs, chosen):
        summary = r.summary or {}
        values = {**r.last("val"), **r.last("test")}
        mark = "" if c["selected"] else f" {FALLBACK}"
        best = [c[variant].get(m) for m in metrics for variant in ("model", "eq")]
        rows.append(
            [
                label,
                r.method,
                summary.get("steps", r.final.get("step")),
                summary.get("wall_time"),
                f"{c['step']} / {c['eq_step']}" if c["selected"] else "-",
                *(v if v is None or not mark else f"{v:.4g}{mark}" for v in best),
                *(values.get(k) for k in finals),
                (summary.get("best", {}).get("val/loss") or {}).get("value"),
            ]
        )
    table = format_table(header, rows)
    if any(not c["selected"] for c in chosen):
        table += (
            f"\n\n{FALLBACK} no `selected` in summary.json (an older or unfinished run, or one without a "
            "validation set): the final test values stand in."
        )
    return table


def _plot_compare(runs: Sequence[RunData], labels: Sequence[str], out: Path) -> list[Path]:
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


# --------------------------------------------------------------------------- sweep


def _split_values(text: str) -> list[str]:
    """Split ``v1,v2`` on top-level commas (a YAML ``{a: 1, b: 2}`` or ``[1, 2]`` stays whole)."""
    values, depth, current = [], 0, ""
    for char in text:
        if char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        if char == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += char
    return [*values, current]


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """``["dual.lr=0.1,1", "optim.lr=1e-3"]`` -> ``{"dual.lr": ["0.1", "1"], "optim.lr": ["1e-3"]}``."""
    from .config import ConfigError

    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key or not text:
            raise ConfigError(f"sweep: {item!r} is not of the form key=v1,v2,...")
        if key in grid:
            raise ConfigError(f"sweep: key {key!r} given twice")
        grid[key] = _split_values(text)
    return grid


def _run_name(overrides: Sequence[str], varying: set[str]) -> str:
    parts = [o for o in overrides if o.partition("=")[0] in varying]
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", "_".join(parts)) or "run"


def sweep(config: str | Path, grid: dict[str, Sequence[str]] | Sequence[str], out_dir: str | Path) -> str:
    """Train every combination of ``grid`` (``{key: [values]}`` or ``["key=v1,v2", ...]``) in turn.

    Each run goes to ``out_dir/<key=value_...>`` (only the keys with several values name it). Finished
    runs (with ``summary.json``) are skipped and unfinished ones resumed, so calling again after an
    interruption finishes the sweep. Every config is checked before the first run starts, and a run
    directory whose saved config differs (e.g. other fixed overrides) stops the sweep before it trains.
    Returns the :func:`compare` table of all the grid's runs, also written to ``out_dir``.
    """
    from . import experiment
    from .config import load_config

    grid = (
        parse_grid(grid)
        if not isinstance(grid, dict)
        else {k: [str(v) for v in vs] for k, vs in grid.items()}
    )
    out_dir = Path(out_dir)
    varying = {k for k, vs in grid.items() if len(vs) > 1}
    combos = [[f"{k}={v}" for k, v in zip(grid, values)] for values in itertools.product(*grid.values())]
    plan = [(out_dir / _run_name(overrides, varying), load_config(config, overrides)) for overrides in combos]
    stale = [
        f"{path.name} ({'; '.join(changes)})"
        for path, cfg in plan
        if (path / "config.yaml").exists() and (changes := experiment.config_changes(path, cfg))
    ]
    if stale:  # a finished run of another config would be shown as this sweep's result
        raise experiment.RunDirError(
            f"{out_dir}: runs trained with another config: {', '.join(stale)}; remove them or sweep into "
            "another --out"
        )
    for i, (path, cfg) in enumerate(plan, 1):
        if (path / "summary.json").exists():
            print(f"[{i}/{len(plan)}] {path.name}: finished, skipped")
            continue
        resume = (path / "config.yaml").exists()
        print(f"[{i}/{len(plan)}] {path.name}: {'resuming' if resume else 'training'}")
        experiment.run(cfg, path, resume=resume)
    return compare([path for path, _ in plan], out=out_dir)


# --------------------------------------------------------------------------- export


def _bake(model: nn.Module) -> nn.Module:
    """Replace every parametrization of ``model`` (the bounded branches' spectral norm) by its current value,
    in place: torch cannot pickle a parametrized module. (In place because removing a parametrization from a
    deep copy also strips the original, whose class the copy shares.)"""
    from torch.nn.utils import parametrize

    for m in model.modules():
        if parametrize.is_parametrized(m):
            for name in list(m.parametrizations):
                parametrize.remove_parametrizations(m, name, leave_parametrized=True)
    return model


def export(
    run_dir: str | Path, out_path: str | Path, equivariant: bool = False, batches: int = 3, samples: int = 4
) -> dict[str, float]:
    """Save a run's trained model and measure its equivariance error in float64.

    Rebuilds the model from the run's config, loads ``checkpoints/last.pt`` and, with ``equivariant``,
    strips it to f_eq. Writes the whole module to ``out_path`` (load with
    ``torch.load(path, weights_only=False)``, ace importable), with the bounded branches' spectral norm
    baked into plain weights (torch cannot pickle parametrized modules), and its ``state_dict`` next to it
    (``<stem>.state_dict.pt``, loads with ``weights_only=True``). The error is measured on the first
    ``batches`` validation batches with ``samples`` group elements each.

    Returns:
        ``{"max_abs_error": max |f(g.x) - rho(g) f(x)|, "deviation": D, "relative_deviation": D_rel}``.
    """
    import torch

    from .batches import split_batch
    from .checkpoint import CheckpointError
    from .deviation import equivariance_deviation
    from .experiment import RunDirError, load_run_config, prepare_run
    from .relax import gates, strip
    from .testing import _cast, assert_equivariant

    checkpoint = Path(run_dir) / "checkpoints" / "last.pt"
    cfg = load_run_config(run_dir)
    if not checkpoint.exists():
        raise RunDirError(f"{run_dir} has no checkpoint ({checkpoint}) to export")
    cfg.train.device = "cpu"
    trainer, loaders = prepare_run(cfg, None)
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        trainer.model.load_state_dict(state["model"])
    except Exception as err:  # unreadable or foreign: one clear message
        raise CheckpointError(f"cannot load the model from {checkpoint}: {err}") from err
    model = trainer.model
    if equivariant:
        if not gates(model) and cfg.method != "strict":
            raise ExportError(
                f"{run_dir}: the model has no gated layers, so it has no exactly equivariant part f_eq to "
                "export; export it without --equivariant"
            )
        model = strip(model)
    model = _bake(model.eval())  # a model built for this export only
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model, out_path)
    torch.save(model.state_dict(), out_path.with_name(out_path.stem + ".state_dict.pt"))

    probe = copy.deepcopy(model).to(torch.float64)
    generator = torch.Generator().manual_seed(cfg.seed)
    worst, deviations, relatives = 0.0, [], []
    with torch.no_grad():
        for batch in itertools.islice(loaders["val"], batches):
            inputs = _cast(split_batch(batch)[0], torch.float64)
            state = generator.get_state()
            worst = max(
                worst,
                assert_equivariant(
                    probe, inputs, trainer.symmetry, samples, atol=math.inf, generator=generator
                ),
            )
            for relative, sink in ((False, deviations), (True, relatives)):
                generator.set_state(state)
                sink.append(
                    equivariance_deviation(probe, inputs, trainer.symmetry, samples, relative, generator)
                )
    return {
        "max_abs_error": worst,
        "deviation": float(torch.stack(deviations).mean()),
        "relative_deviation": float(torch.stack(relatives).mean()),
    }
