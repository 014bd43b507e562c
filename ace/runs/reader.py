"""A run directory read once: its config, records and summary, and the test metrics at the best
validation step (the layout is :mod:`ace.runs.layout`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from ace.runs.layout import CONFIG, METRICS, SUMMARY
from ace.runs.metrics import read_metrics

__all__ = ["RunData", "best_val_test"]

#: footnote marker of values that fall back to the final step (a summary without ``selected``).
FALLBACK = "†"


class RunData:
    """A run directory read once: config, train/val/test records, summary (None while unfinished)."""

    def __init__(self, run_dir: str | Path) -> None:
        from ace.runs.layout import RunDirError

        self.path = Path(run_dir)
        metrics = self.path / METRICS
        if not self.path.is_dir() or not metrics.exists():
            raise RunDirError(
                f"{run_dir} is not a run directory (no metrics.jsonl); "
                f"make one with `ace train CONFIG --out {run_dir}`"
            )
        config = self.path / CONFIG
        self.config: dict = (
            yaml.safe_load(config.read_text(encoding="utf-8")) if config.exists() else None
        ) or {}
        records = read_metrics(metrics)
        self.train = [r for r in records if "loss" in r]
        self.evals = {
            s: [r for r in records if any(k.startswith(s + "/") for k in r)] for s in ("val", "test")
        }
        summary = self.path / SUMMARY
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


def per_layer(metric: str) -> bool:
    """Whether an unprefixed metric name is a per-layer measurement (``deviation/<layer>``)."""
    return "/" in metric.removeprefix("eq/")
