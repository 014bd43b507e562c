"""Sweeps: a grid of overrides trained once, resumed, and refused when the config changed."""

from pathlib import Path

import pytest
from run_kit import CONFIGS, TINY

from ace import experiment
from ace.sweep import parse_grid, sweep


def test_sweep_runs_the_grid_once_and_resumes(tmp_path, monkeypatch):
    calls = []
    original = experiment.run

    def counting(cfg, out, resume=False, overwrite=False):
        calls.append((Path(out).name, resume))
        return original(cfg, out, resume=resume, overwrite=overwrite)

    monkeypatch.setattr(experiment, "run", counting)
    fixed = [o for o in TINY if not o.startswith("train.epochs")]
    grid = ["dual.lr=0.05,0.2", "method=ace,ace_resilient", *fixed, "train.epochs=1"]
    table = sweep(CONFIGS / "toy_relaxed.yaml", grid, tmp_path)
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
    sweep(CONFIGS / "toy_relaxed.yaml", grid, tmp_path)
    assert calls == []
    assert mtimes == {n: (tmp_path / n / "summary.json").stat().st_mtime_ns for n in names}

    (tmp_path / names[0] / "summary.json").unlink()  # an interrupted run is resumed, the others kept
    sweep(CONFIGS / "toy_relaxed.yaml", grid, tmp_path)
    assert calls == [(names[0], True)]
    assert (tmp_path / names[0] / "summary.json").exists()

    calls.clear()  # other fixed overrides: the finished runs are not this sweep's results
    with pytest.raises(experiment.RunDirError, match="runs trained with another config.*optim.lr"):
        sweep(CONFIGS / "toy_relaxed.yaml", [*grid, "optim.lr=0.01"], tmp_path)
    assert calls == []


def test_parse_grid_keeps_yaml_values_whole():
    grid = parse_grid(["dual.lr=0.1,1.0", "constraint.tolerance={type: linear, start: 1, end: 0},0.5"])
    assert grid == {
        "dual.lr": ["0.1", "1.0"],
        "constraint.tolerance": ["{type: linear, start: 1, end: 0}", "0.5"],
    }
