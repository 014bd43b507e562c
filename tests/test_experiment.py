"""End to end through the config and the CLI: run directories, resume, refusal to overwrite."""

import json

import pytest
import torch
from run_kit import ROOT

from ace.cli import main
from ace.config import load_config
from ace.experiment import prepare_run, run
from ace.runs import RunDirError, read_metrics
from ace.train import Trainer

CONFIGS = ROOT / "configs"
SMALL = [
    "data.train_size=128",
    "data.val_size=32",
    "data.test_size=32",
    "train.batch_size=32",
    "log.every=1",
    "log.progress=false",
]


def train_records(out):
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def test_one_config_runs_every_method_each_into_its_own_default_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(CONFIGS / "toy_relaxed.yaml")
    for method in ("strict", "ace"):
        assert main(["train", config, f"method={method}", "train.max_steps=1", *SMALL]) == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["toy_relaxed_ace", "toy_relaxed_strict"]
    for method, gated in (("strict", False), ("ace", True)):
        summary = json.loads((tmp_path / "runs" / f"toy_relaxed_{method}" / "summary.json").read_text())
        assert bool(summary["gates"]) == gated


def test_cli_run_writes_the_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(CONFIGS / "toy.yaml"), "--out", str(out), "train.epochs=2", *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "final balance" in printed and "multiplier" in printed and "held-out read-out: " in printed
    assert {p.name for p in out.iterdir()} >= {"config.yaml", "metrics.jsonl", "summary.json", "checkpoints"}
    assert (out / "checkpoints" / "last.pt").exists()
    records = read_metrics(out / "metrics.jsonl")
    first = records[0]
    for key in (
        "step",
        "epoch",
        "loss",
        "lagrangian",
        "constraint/deviation/tolerance",
        "constraint/deviation/deviation",
        "constraint/deviation/violation",
        "constraint/deviation/multiplier",
    ):
        assert key in first
    val = [r for r in records if "val/loss" in r]
    assert val and "val/relative_deviation" in val[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8
    assert set(summary["constraints"]["deviation"]) >= {"tolerance", "deviation", "violation", "multiplier"}
    # the summary describes the final model: its deviation is the final validation pass's (relative here)
    assert summary["constraints"]["deviation"]["deviation"] == summary["val"]["val/relative_deviation"]
    assert "test/mse" in summary["test"]


def test_gated_run_logs_a_multiplier_and_slack_per_gate(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(CONFIGS / "toy_relaxed.yaml", ["method=ace_resilient", "train.epochs=1", *SMALL])
    summary = run(cfg, out)
    record = train_records(out)[-1]
    for gate in ("layers.0", "layers.1"):
        for field in ("tolerance", "gate", "violation", "multiplier", "slack"):
            assert f"constraint/gate.{gate}/{field}" in record
        # one final gate everywhere: the model's gate after the last update (records hold the gate before)
        final_gate = torch.load(out / "checkpoints" / "last.pt")["model"][f"{gate}.gate"].item()
        assert summary["constraints"][f"gate.{gate}"]["gate"] == summary["gates"][gate] == final_gate
        assert summary["layers"][gate]["gate"] == final_gate
        assert (
            summary["layers"][gate]["relative_deviation"] == summary["val"][f"val/relative_deviation/{gate}"]
        )
        assert record[f"constraint/gate.{gate}/gate"] != final_gate
    assert "val/eq/mse" in summary["val"] and summary["val"]["val/eq/deviation"] < 1e-8


def test_existing_run_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(CONFIGS / "toy.yaml", ["train.epochs=1", *SMALL])
    run(cfg, out)
    with pytest.raises(RunDirError, match="already holds a run"):
        run(cfg, out)
    assert main(["train", str(CONFIGS / "toy.yaml"), "--out", str(out), "train.epochs=1", *SMALL]) == 1
    run(cfg, out, overwrite=True)


def test_resume_with_a_changed_config_is_refused(tmp_path):
    out = tmp_path / "run"
    run(load_config(CONFIGS / "toy.yaml", ["train.epochs=1", *SMALL]), out)
    with pytest.raises(RunDirError, match="optim.lr"):
        run(load_config(CONFIGS / "toy.yaml", ["train.epochs=2", "optim.lr=0.1", *SMALL]), out, resume=True)


def test_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    overrides = ["train.epochs=4", *SMALL]  # 4 steps per epoch, a checkpoint after each epoch
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run(load_config(CONFIGS / "toy.yaml", overrides), whole)

    original = Trainer.train_step

    def killed_at_step_10(self, batch, record=None):
        if self.step == 10:
            raise KeyboardInterrupt  # stands for a kill: nothing is saved after the epoch-2 checkpoint
        return original(self, batch, record)

    monkeypatch.setattr(Trainer, "train_step", killed_at_step_10)
    with pytest.raises(KeyboardInterrupt):
        run(load_config(CONFIGS / "toy.yaml", overrides), parts)
    monkeypatch.setattr(Trainer, "train_step", original)
    assert torch.load(parts / "checkpoints" / "last.pt", weights_only=True)["step"] == 8
    run(load_config(CONFIGS / "toy.yaml", overrides), parts, resume=True)
    assert train_records(parts) == train_records(whole)
    assert_same_checkpoint(whole, parts)


def test_mid_epoch_resume_equals_uninterrupted(tmp_path):
    """Resume from a checkpoint taken in the middle of an epoch (shuffle replayed, batches skipped), with a
    learning-rate schedule (a pure function of the step, written into the restored optimiser)."""
    cfg = load_config(
        CONFIGS / "toy_relaxed.yaml",
        ["method=ace_resilient", "optim.schedule=cosine", "optim.warmup=3", *SMALL],
    )
    trainer, loaders = prepare_run(cfg, tmp_path / "whole")
    trainer.fit(loaders["train"], max_steps=14, print_summary=False)

    first, loaders = prepare_run(cfg, tmp_path / "parts")
    first.fit(loaders["train"], max_steps=6, print_summary=False)  # stops inside epoch 2
    second, loaders = prepare_run(cfg, tmp_path / "parts")
    second.load_checkpoint(tmp_path / "parts" / "checkpoints" / "last.pt")
    second.fit(loaders["train"], max_steps=14, print_summary=False)
    trained = [r for r in trainer.history if "loss" in r]
    assert [r for r in first.history + second.history if "loss" in r] == trained
    assert_same_checkpoint(tmp_path / "whole", tmp_path / "parts")


def assert_same_checkpoint(a_dir, b_dir):
    a = torch.load(a_dir / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(b_dir / "checkpoints" / "last.pt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for name in a["cmp"]["multipliers"]:
        assert torch.equal(a["cmp"]["multipliers"][name]["weight"], b["cmp"]["multipliers"][name]["weight"])
    for name in a["slacks"]:
        assert torch.equal(a["slacks"][name], b["slacks"][name])


def test_config_command_prints_the_resolved_config(capsys):
    assert main(["config", str(CONFIGS / "toy.yaml"), "optim.lr=1e-2"]) == 0
    assert "lr: 0.01" in capsys.readouterr().out
    assert main(["config", str(CONFIGS / "toy.yaml"), "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
