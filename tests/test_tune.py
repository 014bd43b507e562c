"""`ace tune`: spaces checked against the schema, studies on the journal file and on a real PostgreSQL server,
a worker killed mid-trial, pruning that waits for the homotopy, and a best.yaml that `ace train` runs."""

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from run_kit import ROOT

optuna = pytest.importorskip("optuna")

from ace.cli import main  # noqa: E402
from ace.config import (  # noqa: E402
    ConfigError,  # noqa: E402
    load_config,
    load_raw,
)
from ace.tune.search import TuneSettings, homotopy_end, tune  # noqa: E402
from ace.tune.space import as_override, base_values, load_space, parse_space, suggest  # noqa: E402

CONFIG = str(ROOT / "configs" / "toy_relaxed.yaml")
SMALL = [
    "method=ace_resilient",
    "data.breaking=0.5",
    "data.train_size=64",
    "data.val_size=32",
    "data.test_size=32",
    "train.batch_size=16",
    "train.epochs=3",
]
SPACE = """
dual.lr: {low: 0.05, high: 1.0, log: true}
constraint.rho: {low: 0.5, high: 4.0, when: {method: ace_resilient}}
optim.slack_lr: {same_as: dual.lr}
"""


def space_file(tmp_path, text=SPACE):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


def settings(tmp_path, trials, **kw):
    return TuneSettings(CONFIG, space_file(tmp_path), trials, str(tmp_path / "study"), tuple(SMALL), **kw)


def states(study_dir, storage=None, name="study"):
    storage = storage or optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(study_dir / "study.journal"))
    )
    study = optuna.load_study(study_name=name, storage=storage)
    return [t.state.name for t in study.trials], study


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("optim.lrr: {low: 0.1, high: 1.0}", "optim.lrr: the value 0.1 gives no valid config"),
        ("dual.lr: {low: 1.0, high: 0.1}", r"dual.lr: low \(1.0\) > high \(0.1\)"),
        ("dual.lr: {low: 0.0, high: 1.0, log: true}", "a log scale needs low > 0"),
        ("dual.formulation: {choices: [augmented, lagrange]}", "'lagrange' gives no valid config"),
        ("optim.lr: {low: -1.0, high: 1.0}", "optim.lr: the value -1.0 gives no valid config"),
        ("dual.lr: {low: 0.1, hi: 1.0}", "unknown field 'hi'"),
        ("optim.slack_lr: {same_as: dual.lr}", "same_as 'dual.lr': not a key given earlier"),
        ("dual.lr: {low: 0.1}", "low and high must both be finite numbers"),
        ("dual.lr: 0.1", "give a mapping"),
        ("[1, 2]", "a non-empty mapping"),
        ("relax.nothing.deeper: {choices: [1]}", "relax.nothing.deeper: the value 1 gives no valid config"),
        (
            "optim.lr: {low: 0.1, high: 1.0}\ntrain.epochs: {same_as: optim.lr}",
            "train.epochs: the value 0.1 gives",
        ),
    ],
)
def test_a_bad_space_stops_with_one_line_naming_its_key(tmp_path, capsys, text, message):
    with pytest.raises(ConfigError, match=message):
        load_space(space_file(tmp_path, text), load_raw(CONFIG))
    argv = [
        "tune",
        CONFIG,
        "--space",
        space_file(tmp_path, text),
        "--trials",
        "1",
        "--out",
        str(tmp_path / "s"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ace: config error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s" / "trials").exists()  # nothing ran


@pytest.mark.parametrize("config", ["toy_relaxed", "nbody", "images_partial", "spectral_partial"])
def test_the_bundled_space_fits_the_configs_with_a_homotopy(config):
    params = load_space(
        ROOT / "configs" / "spaces" / "duals.yaml", load_raw(ROOT / "configs" / f"{config}.yaml")
    )
    assert [p.key for p in params] == ["dual.lr", "constraint.rho", "constraint.tolerance.fraction"]


def test_suggest_ties_conditions_and_integers():
    params = parse_space(
        {
            "method": {"choices": ["ace", "ace_resilient"]},
            "constraint.rho": {"low": 0.5, "high": 4.0, "when": {"method": "ace_resilient"}},
            "optim.slack_lr": {"same_as": "constraint.rho"},
            "train.batch_size": {"low": 16, "high": 64, "step": 16},
        }
    )
    assert [p.integer for p in params] == [False, False, False, True]
    base = load_raw(CONFIG)
    resilient = suggest(
        params,
        optuna.trial.FixedTrial({"method": "ace_resilient", "constraint.rho": 2.5, "train.batch_size": 32}),
        base,
    )
    assert resilient == [
        "method=ace_resilient",
        "constraint.rho=2.5",
        "optim.slack_lr=2.5",
        "train.batch_size=32",
    ]
    plain = suggest(params, optuna.trial.FixedTrial({"method": "ace", "train.batch_size": 48}), base)
    assert plain == ["method=ace", "train.batch_size=48"]  # rho (and the key tied to it) not sampled
    assert load_config(CONFIG, resilient).optim.slack_lr == 2.5
    # trial 0 is the config as written: its own value of every key that applies
    assert base_values(params, base) == {"method": "ace", "train.batch_size": 64}
    assert (
        as_override("dual.lr", 1e-05) == "dual.lr=1.0e-05"
        and load_config(CONFIG, ["dual.lr=1.0e-05"]).dual.lr == 1e-05
    )


def test_a_study_with_two_workers_completes_and_best_yaml_trains(tmp_path, capsys):
    report = tune(settings(tmp_path, 4, pruner="none"), jobs=2)
    study_dir = tmp_path / "study"
    found, study = states(study_dir)
    assert found.count("COMPLETE") == 4 and "RUNNING" not in found
    first = study.trials[0]  # the config as written
    assert first.params == {"dual.lr": 0.2, "constraint.rho": 1.0}
    cfg = load_config(study_dir / "trials" / "trial_0000" / "config.yaml")
    assert (cfg.dual.lr, cfg.constraint.rho, cfg.optim.slack_lr) == (
        0.2,
        1.0,
        0.2,
    )  # slack_lr tied to dual.lr
    rows = list(csv.DictReader((study_dir / "trials.csv").open()))
    assert len(rows) == 4 and {r["state"] for r in rows} == {"complete"}
    best = min(study.trials, key=lambda t: t.values[0])
    assert report["best"]["trial"] == best.number and report["best"]["value"] == best.values[0]
    # the objective is the best validation loss, never the test set
    summary = json.loads((study_dir / "trials" / f"trial_{best.number:04d}" / "summary.json").read_text())
    assert best.values[0] == summary["selected"]["model"]["val"]["loss"]
    assert best.user_attrs["test/mse"] == summary["selected"]["model"]["test"]["mse"]
    assert (study_dir / "history.png").stat().st_size > 0
    # best.yaml is a config `ace train` runs, the best trial's values in it
    assert main(["train", str(study_dir / "best.yaml"), "--out", str(tmp_path / "again")]) == 0
    again = load_config(tmp_path / "again" / "config.yaml")
    assert again.dual.lr == pytest.approx(best.params["dual.lr"]) and again.data.breaking == 0.5
    # rerunning with more trials continues the study
    tune(settings(tmp_path, 5, pruner="none"))
    assert states(study_dir)[0].count("COMPLETE") == 5


def test_pruning_waits_for_the_homotopy(tmp_path):
    from ace.experiment import prepare_run
    from ace.tune.search import _Reporter

    base = [*SMALL, "train.epochs=0", "train.max_steps=40"]
    for method, tolerance, end in [
        ("ace", "0.0", 0),
        ("scheduled", "{type: linear, start: 1.0, end: 0.0}", 40),
        ("scheduled", "{type: cosine, start: 1.0, end: 0.0, fraction: 0.25}", 10),
        ("cr", "0.0", 40),
    ]:
        trainer, _ = prepare_run(
            load_config(CONFIG, [*base, f"method={method}", f"constraint.tolerance={tolerance}"]), None
        )
        assert homotopy_end(trainer) == end, method

    class Trial:  # every report asks to prune
        reported = []

        def report(self, value, step):
            self.reported.append(step)

        def should_prune(self):
            return True

    cr = _Reporter(Trial(), "val/loss")  # the last trainer: method cr, whose gate schedule runs to the end
    cr(trainer, {"step": 20, "val/loss": 1.0})
    with pytest.raises(optuna.TrialPruned):
        cr(trainer, {"step": 40, "val/loss": 1.0})
    # no schedule (ace), but the first quarter of the run (10 of 40 steps) is spared
    early = _Reporter(Trial(), "val/loss")
    ace_trainer, _ = prepare_run(load_config(CONFIG, [*base, "method=ace"]), None)
    early(ace_trainer, {"step": 9, "val/loss": 1.0})
    with pytest.raises(optuna.TrialPruned):
        early(ace_trainer, {"step": 10, "val/loss": 1.0})
    assert Trial.reported == [20, 40, 9, 10]


def test_a_worker_killed_mid_trial_is_adopted_and_its_run_resumed(tmp_path):
    space = space_file(tmp_path)
    study_dir = tmp_path / "study"
    slow = [
        *SMALL,
        "data.train_size=512",
        "train.epochs=20",
        "train.checkpoint_every=1",
    ]  # 640 steps, seconds
    command = [sys.executable, "-m", "ace", "tune", CONFIG, *slow, "--space", space, "--trials", "1"]
    command += ["--out", str(study_dir), "--pruner", "none"]
    worker = subprocess.Popen(
        command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    checkpoint = study_dir / "trials" / "trial_0000" / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and worker.poll() is None:
        time.sleep(0.2)
    assert checkpoint.exists(), worker.stderr.read().decode()
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    found, _ = states(study_dir)
    assert found == ["RUNNING"]  # left running by the dead worker
    metrics = study_dir / "trials" / "trial_0000" / "metrics.jsonl"
    steps_before = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "trial 0 was left running by a dead worker; resuming it" in done.stdout
    found, study = states(study_dir)
    assert found == ["COMPLETE"]
    summary = json.loads((study_dir / "trials" / "trial_0000" / "summary.json").read_text())
    assert summary["steps"] == 20 * 32 and max(steps_before) > 0
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    assert [r["step"] for r in records if "loss" in r] == sorted({r["step"] for r in records if "loss" in r})
    assert study.trials[0].params == {"dual.lr": 0.2, "constraint.rho": 1.0}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A real PostgreSQL server in a temporary folder (Debian's postgresql package; .ci/run installs it)."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not bins and not os.environ.get("ACE_REQUIRE_POSTGRES"):  # .ci/run installs it and requires the test
        pytest.skip("no PostgreSQL server installed (apt-get install postgresql)")
    pg = bins[-1]
    folder = Path(tempfile.mkdtemp(prefix="ace-pg-"))  # not under pytest's folder, which only root may enter
    data, port = folder / "data", _free_port()
    as_user = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(folder, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*as_user, pg / "initdb", "-D", data, "-U", "ace", "--auth=trust"], check=True, capture_output=True
    )
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1"
    subprocess.run(
        [*as_user, pg / "pg_ctl", "-D", data, "-o", options, "-w", "-l", folder / "log", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg2://ace@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg / "pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def test_a_study_on_postgresql_with_two_workers(tmp_path, postgres):
    report = tune(settings(tmp_path, 4, storage=postgres, study="pg-study", pruner="none"), jobs=2)
    found, study = states(None, storage=postgres, name="pg-study")
    assert found.count("COMPLETE") == 4 and "RUNNING" not in found
    assert report["best"]["value"] == min(t.values[0] for t in study.trials)
    assert not (tmp_path / "study" / "study.journal").exists()


def test_a_pareto_study_and_a_deviation_bound(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "b").mkdir()
    tune(settings(tmp_path / "p", 2, pareto=True))
    _, study = states(tmp_path / "p" / "study")
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    for t in study.trials:
        summary = json.loads((Path(t.user_attrs["run"]) / "summary.json").read_text())
        assert t.values == [summary["selected"]["model"]["val"][k] for k in ("loss", "relative_deviation")]
    assert (tmp_path / "p" / "study" / "pareto.png").exists()
    # a bound no trial meets: every trial is infeasible, so none is best and no best.yaml is written
    report = tune(settings(tmp_path / "b", 2, max_deviation=1e-12, pruner="none"))
    assert "best" not in report and not (tmp_path / "b" / "study" / "best.yaml").exists()
    rows = list(csv.DictReader((tmp_path / "b" / "study" / "trials.csv").open()))
    assert [r["feasible"] for r in rows] == ["False", "False"]


def test_a_metric_the_task_does_not_measure_is_refused_before_any_trial(tmp_path, capsys):
    argv = ["tune", CONFIG, "--space", space_file(tmp_path), "--trials", "1", "--out", str(tmp_path / "s")]
    assert main([*argv, "--metric", "accuracy"]) == 2
    assert "--metric 'accuracy' is not a metric of task 'toy'; one of: loss, mse" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
