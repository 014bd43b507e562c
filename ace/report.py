"""What a finished run says about the equivariance/fit balance: the report of one run (balance, prices, gap).

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

import math
from pathlib import Path
from typing import Any

import torch

from ace.runs.metrics import format_table
from ace.runs.plots import plot_run
from ace.runs.reader import RunData, best_val_test, per_layer
from ace.train.heldout import COMPARED_WITH, HeldOut

__all__ = ["report", "verdict", "constraint_state", "is_active"]

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
    if slack is not None and slack > SLACK_ZERO:
        assert value is not None, "a constraint row holds its gate or its deviation"
        if abs(value) > row.get("tolerance", 0.0):
            return "kept slack"
    if is_active(row, equality):
        return "constraint active" + (" (violated)" if abs(row["violation"]) > _band(row) else "")
    return "constraint inactive"


def report(run_dir: str | Path, plots: bool = True) -> str:
    """Write ``RUN/report.md`` (and PNG plots in ``RUN/``) for a run and return the markdown.

    Sections: the balance table (tolerance, gate or deviation, violation, multiplier, slack, measured relative
    deviation, verdict and constraint state per constraint entry and gated layer), the multipliers read as
    prices, the held-out read-out (:mod:`ace.train.heldout`) beside the training-priced verdict, f_eq against
    the
    relaxed model (last validation and test records, and test at the best validation step), the best
    validation values, and the plots.
    """
    run = RunData(run_dir)
    lines = [f"# Run report: {run.path}", "", _header(run), ""]
    lines += _balance(run)
    measured = {name: row.get("relative_deviation") for name, row in run.layers().items()}
    broken = sorted(name for name, dev in measured.items() if dev is not None and dev > SYMMETRIC)
    selected = ((run.summary or {}).get("selected") or {}).get("model", {}).get("val", {})
    lines += report_lines(
        of_run(run.path, run.summary), broken, SYMMETRIC, selected.get("relative_deviation")
    )
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
    deviations: dict[str, float] = {
        n: r["relative_deviation"] for n, r in layers.items() if r.get("relative_deviation") is not None
    }
    worst = max(deviations, key=deviations.__getitem__, default=None)
    if worst is not None and deviations[worst] > SYMMETRIC:
        lines += [
            f"`{worst}` gives up the most symmetry: with only its branch enabled the measured relative "
            f"deviation is {deviations[worst]:.3g}.",
            "",
        ]
    elif deviations and len(deviations) == len(layers):
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
            if key.startswith(prefix) and not metric.startswith("eq/") and not per_layer(metric):
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
            if not per_layer(metric):
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
        if not per_layer(key.partition("/")[2])
    ]
    return ["## Best validation values", "", format_table(["metric", "best", "step"], rows), ""]


def of_run(run_dir: Any, summary: dict | None, recompute: bool = False) -> dict[str, Any]:
    """A run's held-out read-out: ``summary["heldout"]``, or (runs made before it existed, before it scored
    the loss per sample or compared with transformed data, or ``recompute``) computed now from the run's best
    relaxed checkpoint (without one, the summary's older read-out, or ``{}``)."""
    stored = (summary or {}).get("heldout", {})
    if "samples" in stored and stored["compared_with"] in (COMPARED_WITH, "f_eq") and not recompute:
        return stored
    from ace.runs.layout import best_checkpoint

    best = best_checkpoint(Path(run_dir), "model")
    if not best.exists():
        return stored if "compared_with" in stored else {}
    from ace.experiment import trained_run

    _, trainer, loaders = trained_run(run_dir, "read out")
    trainer.model.load_state_dict(torch.load(best, map_location="cpu", weights_only=True)["model"])
    return trainer.validation.read_out(loaders["val"], loaders.get("test"))


def report_lines(
    read_out: dict[str, Any], broken: list[str], threshold: float, deviation: float | None = None
) -> list[str]:
    """The report's section: the read-out's table and one sentence on what it and the training price
    conclude (``broken``: the gated layers whose measured relative deviation exceeds ``threshold``, the
    training-side verdict of :mod:`ace.runs.report`; ``deviation``: the read-out model's relative deviation
    on validation, quoted when the verdict is undecided)."""
    if not read_out:
        return []
    metric = read_out["metric"]
    units = read_out.get("units", read_out.get("batches"))
    unit = f"{units} samples" if units == read_out.get("samples") else f"{units} batches"
    rows = [(f"whole model (vs {read_out['compared_with']})", read_out)]
    test = (
        [(f"whole model, test split (vs {read_out['compared_with']})", read_out["test"])]
        if "test" in read_out
        else []
    )
    rows += test
    rows += [("f_eq (every branch)", read_out["eq"])] if "eq" in read_out else []
    rows += list(read_out["layers"].items())
    lines = [
        "## Held-out read-out (validation data, the whole model on test data too; best relaxed checkpoint)",
        "",
        f"benefit = how much better the relaxed model's validation {metric} is than without the relaxation "
        f"(> 0: the relaxation helps); 95 % bootstrap interval over {unit}. The first row judges the data "
        "(against transformed data: how much worse the model does on transformed copies of the samples); the "
        "branch rows judge this model (its weights co-adapted with its branches).",
        "",
        f"| relaxation removed | {metric} relaxed | {metric} without | benefit | 95 % interval | verdict |",
        "|---|---|---|---|---|---|",
    ]
    verdicts = {}
    for name, r in rows:  # the verdict from the numbers: the same rule for runs of any version
        verdicts[name] = HeldOut(r["benefit"], r["low"], r["high"], r["relaxed"], r["without"]).verdict
        lines.append(
            f"| {name} | {r['relaxed']:.4g} | {r['without']:.4g} | {r['benefit']:.3g} | "
            f"{r['low']:.3g} .. {r['high']:.3g} | {verdicts[name]} |"
        )
    held = verdicts[rows[0][0]]
    priced = "breaks" if broken else "symmetric"
    said = {"breaks": "the data break the symmetry", "symmetric": "the data are symmetric"}
    undecided = (
        "the verdict is undecided: too few held-out samples, or a model too close to invariant to show an "
        "asymmetry the data may have"
    )
    if deviation is not None:  # a resilient run given more room (smaller rho) tests the data harder
        undecided += f" (its relative deviation on validation: {deviation:.2g})"
    sentence = f"Held out, {said.get(held, undecided)}"
    sentence += f"; priced on the training loss, {said[priced]}"
    sentence += f" ({', '.join(broken)} measured above {threshold:g})" if broken else ""
    if held in said and held != priced:
        sentence += ": they disagree, and the held-out read-out is the one that generalises"
    if test:
        confirmed = verdicts[test[0][0]]
        sentence += f". On the test split the whole model reads {confirmed}"
        sentence += "" if confirmed == held else f", so the validation verdict ({held}) is not confirmed"
    lines += ["", sentence + ".", ""]
    return lines
