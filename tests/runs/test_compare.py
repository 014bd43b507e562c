"""Runs side by side: test at the best validation step, every run listed; the CLI's report and compare."""

import json

import numpy as np
from PIL import Image
from run_kit import fake_run, tables

from ace.cli import main
from ace.runs.compare import compare


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
