"""Reports, comparisons, sweeps and exports of short toy runs: numbers, plots, resumption, exactness."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ace import experiment
from ace.cli import main
from ace.config import load_config
from ace.experiment import run
from ace.loggers import read_metrics
from ace.report import compare, export, parse_grid, report, sweep, verdict
from ace.testing import assert_equivariant

CONFIGS = Path(__file__).parent.parent / "configs"
TINY = [
    "data.train_size=64",
    "data.val_size=32",
    "data.test_size=32",
    "train.batch_size=16",
    "train.epochs=3",
    "log.every=2",
    "log.progress=false",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A resilient gate run (slacks) and a deviation-constrained MLP run."""
    root = tmp_path_factory.mktemp("runs")
    gated, plain = root / "gated", root / "plain"
    run(load_config(CONFIGS / "toy_ace.yaml", [*TINY, "method=ace_resilient"]), gated)
    run(load_config(CONFIGS / "toy.yaml", TINY), plain)
    return gated, plain


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


def test_report_numbers_equal_the_logs(runs):
    for path in runs:
        text = report(path)
        assert (path / "report.md").read_text() == text
        summary = json.loads((path / "summary.json").read_text())
        last_train = [r for r in read_metrics(path / "metrics.jsonl") if "loss" in r][-1]
        found = tables(text)
        balance = next(rows for title, rows in found.items() if title.startswith("Balance"))
        header, *rows = balance
        assert len(rows) == len(summary["constraints"]) >= 1
        for row in rows:
            entry = summary["constraints"][row[0]]
            cells = dict(zip(header, row))
            assert same(cells["tolerance"], entry["tolerance"])
            assert same(cells["deviation / gate"], entry.get("gate", entry.get("deviation")))
            assert same(cells["multiplier"], last_train[f"constraint/{row[0]}/multiplier"])
            assert same(cells["violation"], entry["violation"])
            assert cells["slack"] == "-" if "slack" not in entry else same(cells["slack"], entry["slack"])
        header, *rows = found["f_eq against the relaxed model"]
        for row in rows:
            split = row[0].split()[0]
            record = summary[split]
            assert same(row[2], record[f"{split}/{row[1]}"])
            eq = record.get(f"{split}/eq/{row[1]}")
            assert row[3] == "-" if eq is None else same(row[3], eq)
        header, *rows = found["Best validation values"]
        assert {r[0] for r in rows} == set(summary["best"])
        for name, best, step in rows:
            assert same(best, summary["best"][name]["value"]) and int(step) == summary["best"][name]["step"]
        header, *rows = found["Multipliers as prices"]
        assert [float(r[3]) for r in rows] == sorted((float(r[3]) for r in rows), reverse=True)


def test_report_plots_are_real_images(runs):
    gated, plain = runs
    report(gated)
    report(plain)
    expected = {
        gated: ["multipliers", "gates", "slacks", "tolerance", "loss"],
        plain: ["multipliers", "tolerance", "loss"],
    }
    for path, names in expected.items():
        for name in names:
            image = Image.open(path / f"{name}.png")
            image.verify()
            pixels = np.asarray(Image.open(path / f"{name}.png").convert("L"), dtype=float)
            assert pixels.shape[0] > 200 and pixels.shape[1] > 300
            assert pixels.std() > 10, f"{name}.png looks blank"
    assert not (plain / "gates.png").exists() and not (plain / "slacks.png").exists()


def test_verdicts_follow_the_documented_thresholds():
    assert verdict({"tolerance": 0.0, "gate": 0.004, "violation": 0.004, "multiplier": 1.0}) == (
        "driven to equivariance"
    )
    kept = {"tolerance": 0.0, "gate": 0.07, "violation": -0.006, "multiplier": 0.06, "slack": 0.07}
    assert verdict(kept) == "kept slack"
    active = {"tolerance": 0.01, "deviation": 0.0115, "violation": 0.0015, "multiplier": 2.0}
    assert verdict(active) == "constraint active"
    assert verdict({**active, "deviation": 0.05, "violation": 0.04}) == "constraint active (violated)"
    assert verdict({**active, "deviation": 0.005, "violation": -0.005}) == "constraint inactive"
    assert verdict({"tolerance": 0.0, "gate": -0.3, "violation": -0.3, "multiplier": 0.1}, equality=True) == (
        "constraint active (violated)"
    )


def test_compare_lists_both_runs(runs, tmp_path):
    table = compare(runs, out=tmp_path)
    assert "gated" in table and "plain" in table and "ace_resilient" in table and "scheduled" in table
    lines = (tmp_path / "compare.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[1].startswith("gated,") and lines[2].startswith("plain,")
    summary = json.loads((runs[0] / "summary.json").read_text())
    header, gated = lines[0].split(","), lines[1].split(",")
    assert float(gated[header.index("val/loss")]) == summary["val"]["val/loss"]
    for name in ("compare_loss", "compare_deviation"):
        assert np.asarray(Image.open(tmp_path / f"{name}.png").convert("L"), dtype=float).std() > 10


def test_sweep_runs_the_grid_once_and_resumes(tmp_path, monkeypatch):
    calls = []
    original = experiment.run

    def counting(cfg, out, resume=False, overwrite=False):
        calls.append((Path(out).name, resume))
        return original(cfg, out, resume=resume, overwrite=overwrite)

    monkeypatch.setattr(experiment, "run", counting)
    fixed = [o for o in TINY if not o.startswith("train.epochs")]
    grid = ["dual.lr=0.05,0.2", "method=ace,ace_resilient", *fixed, "train.epochs=1"]
    table = sweep(CONFIGS / "toy_ace.yaml", grid, tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert names == [
        "dual.lr=0.05_method=ace",
        "dual.lr=0.05_method=ace_resilient",
        "dual.lr=0.2_method=ace",
        "dual.lr=0.2_method=ace_resilient",
    ]
    assert len(calls) == 4 and all(name in table for name in names)
    assert (tmp_path / "compare.csv").exists() and (tmp_path / "compare.md").exists()
    mtimes = {n: (tmp_path / n / "summary.json").stat().st_mtime_ns for n in names}

    calls.clear()
    sweep(CONFIGS / "toy_ace.yaml", grid, tmp_path)
    assert calls == []
    assert mtimes == {n: (tmp_path / n / "summary.json").stat().st_mtime_ns for n in names}

    (tmp_path / names[0] / "summary.json").unlink()  # an interrupted run is resumed, the others kept
    sweep(CONFIGS / "toy_ace.yaml", grid, tmp_path)
    assert calls == [(names[0], True)]
    assert (tmp_path / names[0] / "summary.json").exists()


def test_parse_grid_keeps_yaml_values_whole():
    grid = parse_grid(["dual.lr=0.1,1.0", "constraint.tolerance={type: linear, start: 1, end: 0},0.5"])
    assert grid == {
        "dual.lr": ["0.1", "1.0"],
        "constraint.tolerance": ["{type: linear, start: 1, end: 0}", "0.5"],
    }


def test_export_writes_an_exactly_equivariant_model(runs, tmp_path, capsys):
    gated, plain = runs
    out = tmp_path / "feq.pt"
    assert main(["export", str(gated), str(out), "--equivariant"]) == 0
    assert "equivariance error" in capsys.readouterr().out
    model = torch.load(out, weights_only=False)
    state = torch.load(tmp_path / "feq.state_dict.pt", weights_only=True)
    assert not any("gate" in k or "branch" in k for k in state)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    cfg = load_config(CONFIGS / "toy_ace.yaml", TINY)
    x = experiment.build_task(cfg).val.tensors[0]
    symmetry = experiment.build_task(cfg).symmetry
    assert assert_equivariant(model, x, symmetry, samples=8) < 1e-8

    errors = export(gated, tmp_path / "relaxed.pt")
    assert errors["max_abs_error"] > 1e-6  # the relaxed model keeps its symmetry-breaking branches
    assert main(["export", str(plain), str(tmp_path / "x.pt"), "--equivariant"]) == 1
    assert "no gated layers" in capsys.readouterr().err


def test_cli_report_and_compare(runs, tmp_path, capsys):
    gated, plain = runs
    assert main(["report", str(gated)]) == 0
    printed = capsys.readouterr().out
    assert "Balance at step" in printed and "verdict" in printed
    assert main(["compare", str(gated), str(plain), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert "gated" in printed and "plain" in printed and (tmp_path / "cmp" / "compare.csv").exists()
    assert main(["report", str(tmp_path)]) == 1
    assert "is not a run directory" in capsys.readouterr().err
