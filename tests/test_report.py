"""Reports, comparisons, sweeps and exports of short toy runs: numbers, plots, resumption, exactness."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ace import experiment
from ace.cli import main
from ace.compare import compare
from ace.config import load_config
from ace.experiment import run
from ace.export import export
from ace.report import constraint_state, report, verdict
from ace.run_data import best_val_test
from ace.sweep import parse_grid, sweep
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
        found = tables(text)
        balance = next(rows for title, rows in found.items() if title.startswith("Balance"))
        header, *rows = balance
        assert len(rows) == len(summary["constraints"]) >= 1
        for row in rows:  # the final model, after the last update: summary.json's numbers
            entry = summary["constraints"][row[0]]
            cells = dict(zip(header, row))
            assert same(cells["tolerance"], entry["tolerance"])
            assert same(cells["deviation / gate"], entry.get("gate", entry.get("deviation")))
            assert same(cells["multiplier"], entry["multiplier"])
            assert same(cells["violation"], entry["violation"])
            assert cells["slack"] == "-" if "slack" not in entry else same(cells["slack"], entry["slack"])
            layer = summary["layers"].get(row[0].split(".", 1)[-1])
            measured = layer["relative_deviation"] if layer else summary["val"]["val/relative_deviation"]
            assert same(cells["measured rel. deviation"], measured)
            assert cells["verdict"] == verdict(measured)
        header, *rows = found["f_eq against the relaxed model"]
        assert {r[0].split(" (")[1].split(",")[0] for r in rows} == {"final", "best val"}
        for row in rows:
            split = row[0].split()[0]
            if "(best val" in row[0]:
                best = best_val_test(summary)
                assert same(row[2], best["model"][row[1]])
                eq = best["eq"].get(row[1]) if summary["layers"] else None
                assert row[3] == "-" if eq is None else same(row[3], eq)
                continue
            record = summary[split]
            assert same(row[2], record[f"{split}/{row[1]}"])
            eq = record.get(f"{split}/eq/{row[1]}")
            assert row[3] == "-" if eq is None else same(row[3], eq)
        header, *rows = found["Best validation values"]
        assert {r[0] for r in rows} == {k for k in summary["best"] if k.count("/") == 1 or "/eq/" in k}
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
    assert verdict(1e-5) == "symmetric (measured)" and verdict(0.0) == "symmetric (measured)"
    assert verdict(2e-5) == "breaks symmetry (measured rel. deviation 2e-05)"
    assert verdict(0.0123) == "breaks symmetry (measured rel. deviation 0.012)"
    assert verdict(None) == verdict(float("nan")) == "not measured"
    kept = {"tolerance": 0.0, "gate": 0.07, "violation": -0.006, "multiplier": 0.06, "slack": 0.07}
    assert constraint_state(kept) == "kept slack"
    assert constraint_state({**kept, "gate": 0.0}) == "constraint active"  # slack unused: not kept
    active = {"tolerance": 0.01, "deviation": 0.0115, "violation": 0.0015, "multiplier": 2.0}
    assert constraint_state(active) == "constraint active"
    assert (
        constraint_state({**active, "deviation": 0.05, "violation": 0.04}) == "constraint active (violated)"
    )
    assert constraint_state({**active, "deviation": 0.005, "violation": -0.005}) == "constraint inactive"
    equality = {"tolerance": 0.0, "gate": -0.3, "violation": -0.3, "multiplier": 0.1}
    assert constraint_state(equality, equality=True) == "constraint active (violated)"


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


def test_report_relaxes_only_a_material_multiplier_and_judges_the_measured_deviation(tmp_path):
    # delta = 0.1 for gates: 2 * 0.1 = 0.2 >= 0.1 * loss 1 is material, 0.05 * 0.1 = 0.005 is not
    text = report(fake_run(tmp_path / "a", gate_summary([0.05, 2.0], [2e-2, 1e-6])), plots=False)
    header, *rows = tables(text)["Balance at step 100 (after the last update)"]
    cells = [dict(zip(header, r)) for r in rows]
    assert [c["verdict"] for c in cells] == [
        "breaks symmetry (measured rel. deviation 0.02)",
        "symmetric (measured)",
    ]
    assert [c["constraint state"] for c in cells] == ["kept slack", "kept slack"]
    header, *rows = tables(text)["Multipliers as prices"]
    assert [(r[1], r[4], r[6]) for r in rows] == [
        ("gate.layers.1", "0.1", "yes"),
        ("gate.layers.0", "0.1", "no"),
    ]
    assert (
        "Relaxing `gate.layers.1` would gain most: to first order, 0.1 more tolerance lowers the training "
        "loss by about 0.2 (final training loss 1)." in text
    )
    assert (
        "`layers.0` gives up the most symmetry: with only its branch enabled the measured relative "
        "deviation is 0.02." in text
    )

    # the same multipliers against a final loss of 10: every price is negligible; a large gate whose branch
    # measures symmetric is called symmetric
    summary = gate_summary([0.05, 2.0], [1e-5, 1e-6], gates=(0.9, 0.2))
    text = report(fake_run(tmp_path / "b", summary, loss=10.0), plots=False)
    assert "Relaxing" not in text and "No multiplier is material: all prices are negligible." in text
    assert "Every gated layer is symmetric as measured" in text and "gives up the most" not in text
    header, *rows = tables(text)["Balance at step 100 (after the last update)"]
    assert [dict(zip(header, r))["verdict"] for r in rows] == ["symmetric (measured)"] * 2

    inactive = gate_summary([0.5, 0.5], [1e-4, 1e-4])
    for row in inactive["constraints"].values():
        row["violation"] = -0.2
    text = report(fake_run(tmp_path / "c", inactive), plots=False)
    assert "No multiplier is material: no constraint binds at the end" in text


def test_deviation_prices_are_quoted_for_a_tenth_of_the_tolerance_start(tmp_path):
    row = {"tolerance": 0.05, "deviation": 0.05, "violation": 0.0, "multiplier": 1.0}
    summary = {"constraints": {"deviation": row}, "val": {"val/relative_deviation": 0.05}}
    # delta = 0.1 * start 2.0 = 0.2: 1 * 0.2 = 0.2 >= 0.1 * loss 1
    text = report(fake_run(tmp_path / "a", {**summary, "tolerance_starts": {"deviation": 2.0}}), plots=False)
    assert (
        "`deviation` would gain most: to first order, 0.2 more tolerance lowers the training loss by about "
        "0.2 (final" in text
    )
    header, *rows = tables(text)["Balance at step 100 (after the last update)"]
    assert dict(zip(header, rows[0]))["verdict"] == "breaks symmetry (measured rel. deviation 0.05)"
    # no start: delta = 0.1 * the measured deviation 0.05, so 1 * 0.005 = 0.005 is negligible
    text = report(fake_run(tmp_path / "b", summary), plots=False)
    assert "No multiplier is material" in text
    assert tables(text)["Multipliers as prices"][1][4] == "0.005"


def test_report_shows_test_at_the_best_validation_step(tmp_path):
    selected = {
        "model": {"step": 60, "selected_on": "val/loss", "val": {"mse": 0.5}, "test": {"mse": 0.4}},
        "eq": {"step": 80, "selected_on": "val/eq/loss", "val": {"mse": 0.7}, "test": {"mse": 0.6}},
    }
    test = {"step": 100, "test/mse": 0.45, "test/eq/mse": 0.65}
    summary = {**gate_summary([0.0, 0.0], [1e-4, 1e-4]), "selected": selected, "test": test}
    path = fake_run(tmp_path / "a", summary)
    (path / "metrics.jsonl").write_text(
        "\n".join(json.dumps(r) for r in [{"step": 100, "epoch": 5, "loss": 1.0}, test]) + "\n"
    )
    header, *rows = tables(report(path, plots=False))["f_eq against the relaxed model"]
    assert rows == [
        ["test (final, step 100)", "mse", "0.45", "0.65", "0.2", "+44.4%"],
        ["test (best val, step 60; f_eq step 80)", "mse", "0.4", "0.6", "0.2", "+50%"],
    ]


def test_compare_takes_test_at_best_validation_and_marks_older_runs(tmp_path):
    selected = {
        "model": {"step": 60, "selected_on": "val/loss", "test": {"mse": 0.4, "loss": 0.4}},
        "eq": {"step": 80, "selected_on": "val/eq/loss", "test": {"mse": 0.6, "loss": 0.6}},
    }
    test = {"test/mse": 0.45, "test/eq/mse": 0.65, "test/loss": 0.45}
    new = fake_run(tmp_path / "new", {"selected": selected, "test": test})
    old = fake_run(tmp_path / "old", {"test": test})  # before summary["selected"]
    strict = fake_run(tmp_path / "strict", {"selected": {"model": selected["model"]}, "test": test}, "strict")
    for path in (new, old, strict):  # the final test record, as training writes it
        (path / "metrics.jsonl").write_text(
            json.dumps({"step": 100, "loss": 1.0}) + "\n" + json.dumps({"step": 100, **test}) + "\n"
        )
    table = compare([new, old, strict], out=tmp_path / "cmp")
    header, *rows = tables("## t\n" + table)["t"]
    cells = {r[0]: dict(zip(header, r)) for r in rows}
    assert cells["new"]["test mse (best val)"] == "0.4" and cells["new"]["test mse f_eq (best val)"] == "0.6"
    assert (
        cells["new"]["best val step (model / f_eq)"] == "60 / 80"
        and cells["new"]["test/mse (final)"] == "0.45"
    )
    assert (
        cells["old"]["test mse (best val)"] == "0.45 †"
        and cells["old"]["test mse f_eq (best val)"] == "0.65 †"
    )
    assert cells["old"]["best val step (model / f_eq)"] == "-"
    assert cells["strict"]["test mse f_eq (best val)"] == "0.4"  # no gates: f_eq is the model
    assert "† no `selected` in summary.json (an older or unfinished run" in table
    lines = (tmp_path / "cmp" / "compare.csv").read_text().splitlines()
    csv_header = lines[0].split(",")
    new_row, old_row = (dict(zip(csv_header, line.split(","))) for line in lines[1:3])
    assert (new_row["selected"], new_row["test/eq/mse at best val"], new_row["f_eq best val step"]) == (
        "True",
        "0.6",
        "80",
    )
    assert (old_row["selected"], old_row["test/mse at best val"], old_row["best val step"]) == (
        "False",
        "0.45",
        "",
    )


def test_compare_lists_both_runs(runs, tmp_path):
    table = compare(runs, out=tmp_path)
    assert "gated" in table and "plain" in table and "ace_resilient" in table and "scheduled" in table
    lines = (tmp_path / "compare.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[1].startswith("gated,") and lines[2].startswith("plain,")
    summary = json.loads((runs[0] / "summary.json").read_text())
    header, gated = lines[0].split(","), lines[1].split(",")
    assert float(gated[header.index("val/loss")]) == summary["val"]["val/loss"]
    selected = summary["selected"]
    assert float(gated[header.index("test/mse at best val")]) == selected["model"]["test"]["mse"]
    assert float(gated[header.index("test/eq/mse at best val")]) == selected["eq"]["test"]["mse"]
    assert "test mse f_eq (best val)" in table.splitlines()[0] and "†" not in table
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

    calls.clear()  # other fixed overrides: the finished runs are not this sweep's results
    with pytest.raises(experiment.RunDirError, match="runs trained with another config.*optim.lr"):
        sweep(CONFIGS / "toy_ace.yaml", [*grid, "optim.lr=0.01"], tmp_path)
    assert calls == []


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
