"""What a finished run says about the equivariance/fit balance: reports, comparisons, sweeps, exports.

Everything here reads a run directory (``config.yaml``, ``metrics.jsonl``, ``summary.json``,
``checkpoints/last.pt``) and never changes what training wrote.

Verdicts
--------
Each constraint entry (one per gate for gate constraints) gets one verdict from its last logged
training record, with value ``g`` (``|gamma|``, the signed gate for equalities, or the deviation D),
tolerance ``eps``, slack ``u`` and violation ``v = g - eps - u``, checked in this order:

* **driven to equivariance**: ``|g| <= ZERO[kind]`` (``|gamma| <= 1e-2``: the branch adds at most 1%
  of its output; ``D <= 1e-3`` in the constraint's own units, relative when ``relative: true``);
* **kept slack**: a resilient constraint whose slack ``u > SLACK_ZERO`` is in use (``g > eps``): the
  data were judged worth some symmetry breaking;
* **constraint active**: an equality, or ``v > -BAND`` with ``BAND = ACTIVE_BAND * (eps + u) + ACTIVE_FLOOR``
  (within 10% of its bound, plus 1e-3): the constraint binds (or is violated, said so: ``|v| > BAND``),
  and its multiplier is a price;
* **constraint inactive**: satisfied with room to spare; its multiplier should decay to 0.

Prices
------
At a primal-dual solution, ``lambda_i = -dP*/d eps_i``: giving constraint i ``d eps`` more tolerance lowers
the best achievable training loss by about ``lambda_i * d eps``. Entries are ranked by ``|lambda_i|``,
the first being the one whose relaxation would gain most. It is a first-order estimate, only as good as
the run's convergence; fixed penalty weights (method ``penalty``) are not prices.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from .loggers import format_table, read_metrics

__all__ = [
    "report",
    "compare",
    "sweep",
    "export",
    "parse_grid",
    "RunData",
    "verdict",
    "is_active",
    "ExportError",
]

#: ``|g|`` below which a constraint entry counts as exactly equivariant, by entry kind.
ZERO = {"gate": 1e-2, "deviation": 1e-3}
#: a slack larger than this is "kept".
SLACK_ZERO = 1e-3
#: a constraint is active when its violation exceeds ``-(ACTIVE_BAND * (eps + u) + ACTIVE_FLOOR)``.
ACTIVE_BAND = 0.1
ACTIVE_FLOOR = 1e-3
#: the first-order loss change is quoted for this much extra tolerance.
PRICE_STEP = 0.01


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


def _band(row: dict[str, float]) -> float:
    return ACTIVE_BAND * (row.get("tolerance", 0.0) + row.get("slack", 0.0)) + ACTIVE_FLOOR


def is_active(row: dict[str, float], equality: bool = False) -> bool:
    """Whether an entry binds: an equality, or violation ``> -(ACTIVE_BAND * (eps + u) + ACTIVE_FLOOR)``."""
    return equality or row["violation"] > -_band(row)


def verdict(row: dict[str, float], equality: bool = False) -> str:
    """The plain-words verdict of one constraint entry (thresholds in the module docstring)."""
    kind = "gate" if "gate" in row else "deviation"
    value, slack = row[kind], row.get("slack")
    if abs(value) <= ZERO[kind]:
        return "driven to equivariance"
    if slack is not None and slack > SLACK_ZERO and abs(value) > row.get("tolerance", 0.0):
        return "kept slack"
    if is_active(row, equality):
        return "constraint active" + (" (violated)" if abs(row["violation"]) > _band(row) else "")
    return "constraint inactive"


# --------------------------------------------------------------------------- report


def report(run_dir: str | Path, plots: bool = True) -> str:
    """Write ``RUN/report.md`` (and PNG plots in ``RUN/``) for a run and return the markdown.

    Sections: the balance table (tolerance, measured deviation or gate, multiplier, slack, verdict per
    constraint entry), the multipliers read as prices, f_eq against the relaxed model on the last
    validation and test records, the best validation metrics, and the plots.
    """
    run = RunData(run_dir)
    equality = _is_equality(run)
    lines = [f"# Run report: {run.path}", "", _header(run), ""]
    entries = run.entries()
    if entries:
        step = run.final["step"]
        rows = []
        for entry, row in entries.items():
            value_kind = "gate" if "gate" in row else "deviation"
            rows.append(
                [
                    entry,
                    row.get("tolerance"),
                    row.get(value_kind),
                    row.get("violation"),
                    row.get("multiplier"),
                    row.get("slack"),
                    verdict(row, equality),
                ]
            )
        header = [
            "constraint",
            "tolerance",
            "deviation / gate",
            "violation",
            "multiplier",
            "slack",
            "verdict",
        ]
        lines += [
            f"## Balance at step {step} (last logged training step)",
            "",
            format_table(header, rows),
            "",
        ]
        lines += _prices(run, entries, equality)
    elif run.gates():
        rows = [[name, value] for name, value in run.gates().items()]
        lines += ["## Gates (no constraint on them)", "", format_table(["gate", "value"], rows), ""]
    else:
        lines += ["No constraints and no gates: nothing to balance.", ""]
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


def _prices(run: RunData, entries: dict[str, dict[str, float]], equality: bool) -> list[str]:
    if run.method == "penalty":
        return ["The multipliers are fixed penalty weights (method `penalty`), not learned prices.", ""]
    prices = {e: abs(row["multiplier"]) if is_active(row, equality) else 0.0 for e, row in entries.items()}
    ranked = sorted(entries, key=lambda e: -prices[e])
    rows = [
        [rank, e, entries[e]["multiplier"], prices[e], PRICE_STEP * prices[e]]
        for rank, e in enumerate(ranked, 1)
    ]
    header = [
        "rank",
        "constraint",
        "multiplier",
        "loss fall per unit tolerance",
        f"loss fall per +{PRICE_STEP:g} tolerance",
    ]
    lines = [
        "## Multipliers as prices",
        "",
        "lambda = -dP*/d eps: the estimated fall in the best training loss per unit of tolerance given to "
        "a constraint (first order, as good as the run's convergence). An inactive constraint has price 0: "
        "its remaining multiplier is a transient that dual ascent is still draining.",
        "",
        format_table(header, rows),
        "",
    ]
    top = ranked[0]
    if prices[top] > 0:
        lines.append(
            f"Relaxing `{top}` would gain most: about {PRICE_STEP * prices[top]:.3g} of training loss per "
            f"{PRICE_STEP:g} of extra tolerance."
        )
        if equality and entries[top]["multiplier"] < 0:
            lines.append(
                "(A negative multiplier of an equality: the gain comes from letting the gate go negative.)"
            )
    else:
        lines.append("No constraint binds at the end: to first order, relaxing any of them gains nothing.")
    return [*lines, ""]


def _gap(run: RunData) -> list[str]:
    rows = []
    for split in ("val", "test"):
        record = run.last(split)
        prefix = split + "/"
        for key, value in record.items():
            if not key.startswith(prefix) or key.startswith(prefix + "eq/"):
                continue
            metric = key.removeprefix(prefix)
            eq = record.get(f"{prefix}eq/{metric}")
            gap = None if eq is None else eq - value
            pct = None if eq is None or value == 0 else 100 * (eq - value) / abs(value)
            rel = None if pct is None else f"{pct:+.0f}%" if abs(pct) >= 100 else f"{pct:+.3g}%"
            rows.append([f"{split} (step {record['step']})", metric, value, eq, gap, rel])
    if not rows:
        return []
    header = ["split", "metric", "relaxed", "f_eq", "f_eq - relaxed", "relative"]
    note = (
        "f_eq is the model with every gated branch dropped (what `ace export --equivariant` saves)."
        if run.gates()
        else "The model has no gates, so f_eq is not defined; deviations are measured on the model itself."
    )
    return ["## f_eq against the relaxed model", "", note, "", format_table(header, rows), ""]


def _best(run: RunData) -> list[str]:
    if not run.summary or not run.summary.get("best"):
        return []
    rows = [[key, best["value"], best["step"]] for key, best in run.summary["best"].items()]
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


def compare(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> str:
    """Side-by-side table of runs: final and best validation metrics, test metrics, deviation, wall time.

    Returns the markdown table. With ``out``, also writes ``compare.md``, ``compare.csv`` (every final
    and best value) and the overlaid curves ``compare_loss.png`` and ``compare_deviation.png`` there.
    """
    runs = [RunData(d) for d in run_dirs]
    if not runs:
        raise ValueError("compare needs at least one run directory")
    labels = _labels(runs)
    finals = _compare_columns(runs)
    bests = [k for k in dict.fromkeys(k for r in runs for k in (r.summary or {}).get("best", {}))]
    header = ["run", "method", "steps", "wall time (s)", *finals, *(f"best {k}" for k in bests)]
    rows = []
    for label, r in zip(labels, runs):
        summary = r.summary or {}
        values = {**r.last("val"), **r.last("test")}
        rows.append(
            [
                label,
                r.method,
                summary.get("steps", r.final.get("step")),
                summary.get("wall_time"),
                *(values.get(k) for k in finals),
                *((summary.get("best", {}).get(k) or {}).get("value") for k in bests),
            ]
        )
    # markdown: final values, f_eq's val loss and the best val loss; the CSV has every final and best value
    shown = [
        i
        for i, h in enumerate(header)
        if h in ("val/eq/loss", "best val/loss")
        or not ("/eq/" in h or "relative_deviation" in h or h.startswith("best "))
    ]
    table = format_table([header[i] for i in shown], [[row[i] for i in shown] for row in rows])
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
    interruption finishes the sweep. Every config is checked before the first run starts. Returns the
    :func:`compare` table of all the grid's runs, also written to ``out_dir``.
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
    for i, (path, cfg) in enumerate(plan, 1):
        if (path / "summary.json").exists():
            print(f"[{i}/{len(plan)}] {path.name}: finished, skipped")
            continue
        resume = (path / "config.yaml").exists()
        print(f"[{i}/{len(plan)}] {path.name}: {'resuming' if resume else 'training'}")
        experiment.run(cfg, path, resume=resume)
    return compare([path for path, _ in plan], out=out_dir)


# --------------------------------------------------------------------------- export


def export(
    run_dir: str | Path, out_path: str | Path, equivariant: bool = False, batches: int = 3, samples: int = 4
) -> dict[str, float]:
    """Save a run's trained model and measure its equivariance error in float64.

    Rebuilds the model from the run's config, loads ``checkpoints/last.pt`` and, with ``equivariant``,
    strips it to f_eq. Writes the whole module to ``out_path`` (load with
    ``torch.load(path, weights_only=False)``, ace importable) and its ``state_dict`` next to it
    (``<stem>.state_dict.pt``, loads with ``weights_only=True``). The error is measured on the first
    ``batches`` validation batches with ``samples`` group elements each.

    Returns:
        ``{"max_abs_error": max |f(g.x) - rho(g) f(x)|, "deviation": D, "relative_deviation": D_rel}``.
    """
    import copy

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
    model.eval()
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
