"""The report of one run: numbers equal to the logs, real plots, verdicts and prices by the rules."""

import json

import numpy as np
from PIL import Image
from run_kit import fake_run, gate_summary, same, tables

from ace.report import constraint_state, report, verdict
from ace.runs.reader import best_val_test


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
