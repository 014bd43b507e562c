"""A finished run resumed with nothing left to train ends exactly as it was."""

import json
import shutil

import pytest
import torch
from run_kit import CONFIGS, TINY

import ace
from ace.config import load_config
from ace.experiment import run


def test_resuming_a_finished_run_keeps_its_summary_and_its_last_checkpoint(tmp_path):
    cfg = load_config(CONFIGS / "toy_relaxed.yaml", TINY)
    first = run(cfg, tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    again = run(load_config(CONFIGS / "toy_relaxed.yaml", TINY), tmp_path / "b", resume=True)
    assert again["final"] == first["final"] and again["final"]["step"] == first["steps"]
    assert again["selected"] == first["selected"] and again["test"] == first["test"]
    a, b = (
        torch.load(p / "checkpoints" / "last.pt", weights_only=True) for p in (tmp_path / "a", tmp_path / "b")
    )
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])  # the final evaluations draw nothing from it
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["final"] == first["final"]


def test_a_tolerance_schedule_below_zero_is_refused_by_the_python_api_as_by_the_cli():
    with pytest.raises(ValueError, match="tolerance must be >= 0.*down to -1"):
        ace.DeviationConstraint(tolerance=ace.schedules.Linear(start=1.0, end=-1.0, steps=10))
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        ace.GateConstraint(tolerance=lambda step: 0.5 - step / 100)  # any callable
    ace.GateConstraint(tolerance=ace.schedules.Linear(start=1.0, end=0.0, steps=10))  # reaching 0 is fine


def test_an_auto_start_schedule_is_checked_once_its_start_is_measured():
    from ace.tasks.toy import target

    model = torch.nn.Linear(2, 2)
    schedule = ace.schedules.Linear(start="auto", end=-1.0, steps=10)
    trainer = ace.Trainer(
        model,
        torch.nn.functional.mse_loss,
        torch.optim.Adam(model.parameters()),
        symmetry=ace.Symmetry(ace.groups.SO2(), inputs="vector", output="vector"),
        constraints=[ace.DeviationConstraint(tolerance=schedule)],
        progress=False,
    )
    x = torch.randn(8, 2)
    with pytest.raises(ValueError, match="measured start"):
        trainer.fit([(x, target(x))], epochs=1)
