"""Closed gates: 0 for good, their branches no longer computed, kept across a resume."""

import pytest
import torch
from run_kit import CONFIGS, TINY

import ace
from ace.config import load_config
from ace.experiment import run
from ace.runs import read_metrics


def closing_run(out, steps=3, **kw):
    overrides = [*TINY, "optim.close_gates_below=0.5", "train.epochs=4", *(f"{k}={v}" for k, v in kw.items())]
    return run(
        load_config(CONFIGS / "toy_relaxed.yaml", overrides), out, resume=(out / "config.yaml").exists()
    )


def test_a_gate_below_the_threshold_is_closed_for_good(tmp_path):
    summary = closing_run(tmp_path / "run")
    events = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("event") == "gate_closed"]
    assert {e["gate"] for e in events} == {"layers.0", "layers.1"}  # each once
    assert len(events) == 2
    assert all(g == 0.0 for g in summary["gates"].values())
    # closed: the relaxed model is f_eq (no branch computed), and so is each layer's read-out
    assert summary["test"]["test/loss"] == summary["test"]["test/eq/loss"]
    assert summary["layers"]["layers.0"]["relative_deviation"] < 1e-10


def test_a_closed_gate_stays_closed_after_a_resume(tmp_path):
    whole = closing_run(tmp_path / "whole")
    cfg = load_config(CONFIGS / "toy_relaxed.yaml", [*TINY, "optim.close_gates_below=0.5", "train.epochs=2"])
    run(cfg, tmp_path / "half")
    cfg.train.epochs = 4
    resumed = run(cfg, tmp_path / "half", resume=True)
    assert resumed["test"] == whole["test"] and resumed["gates"] == whole["gates"]


def test_closing_needs_an_equality_gate_constraint_and_the_core_stepping_the_gates():
    model = ace.relax(torch.nn.Sequential(torch.nn.Linear(2, 2)), where=["0"])
    optimizer = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="close_gates_below"):
        ace.PrimalDual(model, optimizer, [ace.GateConstraint(resilient=True)], close_gates_below=1e-3)
    with pytest.raises(ValueError, match="close_gates_below"):
        ace.PrimalDual(
            model, optimizer, [ace.GateConstraint(equality=True)], close_gates_below=1e-3, step_gates=False
        )
