"""Run directories for the tests of reading runs (report, compare, sweep, export): tiny toy runs and
hand-built ones."""

import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent  # the repository
CONFIGS = ROOT / "configs"
TINY = [
    "data.train_size=64",
    "data.val_size=32",
    "data.test_size=32",
    "train.batch_size=16",
    "train.epochs=3",
    "log.every=2",
    "log.progress=false",
]


def tables(text):
    """``{section heading: [row cells, ...]}`` of the markdown tables in a report (header row first)."""
    out, section = {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            section = line[3:]
        elif line.startswith("| ") and section:
            out.setdefault(section, []).append([c.strip() for c in line.strip("|").split("|")])
    return out


def same(cell, value):
    """A table cell shows ``value`` to 4 significant digits."""
    return float(cell) == float(f"{value:.4g}")


def fake_run(path, summary, method="ace_resilient", loss=1.0, **config):
    """A hand-built run directory: config, one training record with final loss ``loss``, and ``summary``."""
    path.mkdir()
    (path / "config.yaml").write_text(yaml.safe_dump({"method": method, "task": {"name": "toy"}, **config}))
    (path / "metrics.jsonl").write_text(json.dumps({"step": 100, "epoch": 5, "loss": loss}) + "\n")
    base = {
        "steps": 100,
        "epochs": 5,
        "wall_time": 1.0,
        "final": {"loss": loss},
        "constraints": {},
        "layers": {},
    }
    (path / "summary.json").write_text(json.dumps({**base, **summary}))
    return path


def gate_summary(multipliers, deviations, gates=(0.2, 0.2)):
    """Two active resilient gate constraints (violation 0) with the given multipliers, and per layer the
    measured relative deviation of its branch alone."""
    constraints, layers = {}, {}
    for i, (lam, dev, gate) in enumerate(zip(multipliers, deviations, gates)):
        row = {"gate": gate, "multiplier": lam, "slack": gate}
        constraints[f"gate.layers.{i}"] = {"tolerance": 0.0, "gate": gate, "violation": 0.0, **row}
        layers[f"layers.{i}"] = {**row, "deviation": dev, "relative_deviation": dev}
    return {"constraints": constraints, "layers": layers, "gates": {n: r["gate"] for n, r in layers.items()}}
