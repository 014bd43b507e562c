"""Several runs side by side: final and best-validation metrics, balance, and plots."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ace.runs.metrics import format_table
from ace.runs.plots import plot_compare
from ace.runs.reader import FALLBACK, RunData, best_val_test, per_layer

__all__ = ["compare", "task_metrics"]


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
        m for m in dict.fromkeys(names) if m not in skip and not m.startswith("eq/") and not per_layer(m)
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
    every = [m for m in dict.fromkeys(m for c in chosen for m in c["model"]) if not per_layer(m)]
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
        made = plot_compare(runs, labels, out)
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
        or not ("/eq/" in k or "relative_deviation" in k or per_layer(k.partition("/")[2]))
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
