"""Method ``ace_heldout``: the validation data keep or hold at 0 each layer's slack, once."""

from run_kit import CONFIGS

from ace.config import load_config
from ace.experiment import run
from ace.runs import read_metrics

FAST = ["data.train_size=256", "data.val_size=128", "data.test_size=64", "log.progress=false", "log.every=50"]


def decisions(out):
    return {
        r["layer"]: r for r in read_metrics(out / "metrics.jsonl") if r.get("event") == "heldout_decision"
    }


def test_broken_data_keep_the_slack_of_a_branch_that_helps_on_validation_data(tmp_path):
    cfg = load_config(CONFIGS / "toy_relaxed.yaml", [*FAST, "method=ace_heldout", "data.breaking=0.5"])
    summary = run(cfg, tmp_path / "run")
    made = decisions(tmp_path / "run")
    assert set(made) == {"layers.0", "layers.1"}
    assert {r["step"] for r in made.values()} == {summary["steps"] // 2}  # heldout_after: 0.5
    kept = [name for name, r in made.items() if r["slack"] == "kept"]
    assert kept and all(made[name]["verdict"] == "breaks" and made[name]["low"] > 0 for name in kept)
    assert max(summary["layers"][name]["slack"] for name in kept) > 0.01


def test_symmetric_data_hold_every_slack_the_validation_data_do_not_pay_for_at_zero(tmp_path):
    cfg = load_config(
        CONFIGS / "toy_relaxed.yaml",
        [
            *FAST,
            "method=ace_heldout",
            "data.breaking=0",
            "data.noise=1.0",
            "data.train_size=32",
            "train.epochs=40",
        ],
    )
    summary = run(cfg, tmp_path / "run")
    made = decisions(tmp_path / "run")
    assert set(made) == {"layers.0", "layers.1"}
    assert all(r["verdict"] != "breaks" and r["slack"] == "held at 0" for r in made.values())
    assert all(row["slack"] == 0.0 for row in summary["layers"].values())  # capped: exactly 0 from then on
