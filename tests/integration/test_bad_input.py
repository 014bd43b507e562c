"""Bad input: every malformed config, path or API call is refused before training, naming the key or path.

None of these trains: config errors stop in ``load_config`` or before a run directory is written, and API
errors at construction or in the first step. 240 malformed inputs (with the fault tests in tests/train and
tests/runs: 297).
"""

import dataclasses
import math
import os
import typing
from pathlib import Path

import pytest
import torch
from fault_kit import cli
from run_kit import ROOT
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ace
from ace.cli import main
from ace.config import Config, ConfigError, apply_overrides, config_from_dict, load_config, task_module
from ace.experiment import run
from ace.runs import OutputError
from ace.tasks.cache import cache_path, write_cache

TOY = str(ROOT / "configs" / "toy.yaml")
SMALL = ["train.epochs=1", "data.train_size=32", "model.hidden=8", "log.progress=false", "train.threads=1"]


def float_keys(cls: type, prefix: str) -> list[str]:
    """Every dotted key of ``cls`` (recursively) whose type is a float (or float | None)."""
    keys, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints.get(f.name)
        if dataclasses.is_dataclass(hint):
            keys += float_keys(hint, f"{prefix}{f.name}.")
        elif hint is float or float in typing.get_args(hint):
            keys.append(prefix + f.name)
    return keys


TOY_FLOATS = float_keys(Config, "") + float_keys(task_module("toy").DataConfig, "data.")
NON_FINITE = [(key, value) for key in TOY_FLOATS for value in ("inf", "-.inf", "nan", "1.0e400")]


@pytest.mark.parametrize("key, value", NON_FINITE)
def test_every_non_finite_number_is_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"^{key}: must be a finite number"):
        load_config(TOY, [f"{key}={value}"])


#: keys that must be > 0 (positive) or >= 0; -1 is refused for all, 0 for the positive ones
POSITIVE = [
    "optim.lr", "optim.slack_lr", "optim.gate_lr", "dual.lr", "dual.penalty_coefficient",
    "optim.decay_factor", "constraint.rho", "constraint.samples", "train.batch_size", "train.eval_batch_size",
    "train.eval_every", "train.checkpoint_every", "train.eval_samples", "log.every", "relax.hidden",
    "model.hidden", "model.layers", "model.channels", "data.train_size", "data.val_size", "data.test_size",
    "dual.max_multiplier", "train.threads", "optim.gate_max_step", "optim.decay_every", "optim.grad_clip",
    "train.max_steps",
]  # fmt: skip
NONNEGATIVE = [
    "optim.weight_decay", "constraint.penalty", "train.epochs", "optim.warmup", "optim.min_lr_factor",
    "optim.momentum", "dual.kp", "dual.ki", "seed", "data.noise", "constraint.heldout_after",
]  # fmt: skip
SIGNS = [(k, "-1") for k in POSITIVE + NONNEGATIVE] + [(k, "0") for k in POSITIVE]


@pytest.mark.parametrize("key, value", SIGNS)
def test_negative_and_zero_sizes_and_rates_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"^{key}: must be"):
        load_config(
            TOY, [f"{key}={value}", "train.max_steps=5"] if key == "train.epochs" else [f"{key}={value}"]
        )


def test_zero_epochs_with_max_steps_is_the_steps():
    assert load_config(TOY, ["train.epochs=0", "train.max_steps=5"]).train.epochs == 0


WIDTHS = {  # the size keys of the other tasks (their modules import torch_geometric / e3nn)
    "nbody": ["model.hidden", "model.layers", "model.branch_hidden", "data.num_particles", "data.train_size"],
    "shapes": [
        "model.num_layers", "model.num_neighbors", "model.num_basis", "model.radial_hidden",
        "model.readout_hidden", "model.branch_hidden", "data.num_points", "data.train_size",
    ],
}  # fmt: skip


@pytest.mark.parametrize("task, key", [(t, k) for t, keys in WIDTHS.items() for k in keys])
def test_zero_width_of_every_task_is_refused(task, key):
    pytest.importorskip({"nbody": "torch_geometric", "shapes": "e3nn"}[task])
    for value in ("0", "-4"):
        with pytest.raises(ConfigError, match=rf"{key}"):
            config_from_dict(apply_overrides({"task": task}, [f"{key}={value}"]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["seed=18446744073709551616"], "seed: must be < 2..63"),
        (["seed=9223372036854775808"], "seed: must be < 2..63"),
        (["schema=0"], "schema: 0 is not a schema of ace"),
        (["schema=-3"], "schema: -3 is not a schema of ace"),
        (["method=scheduled", "constraint.tolerance=-0.1"], "constraint.tolerance: a tolerance must be >= 0"),
        (
            ["method=penalty", "constraint.tolerance={type: linear, start: 0.1, end: -0.1}"],
            "constraint.tolerance: a tolerance must be >= 0",
        ),
        (
            ["method=scheduled", "constraint.tolerance={type: cosine, start: auto, end: -1.0e-3}"],
            "constraint.tolerance: a tolerance must be >= 0",
        ),
        (["optim.warmup=.nan"], "optim.warmup: must be a finite number"),
        (["constraint.heldout_after=1.5"], "constraint.heldout_after: a fraction of the run, <= 1, got 1.5"),
        (["train={epochs: 1, epochs: 2}"], "duplicate key 'epochs'"),
    ],
)
def test_values_the_schema_used_to_accept(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TOY, overrides)


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  epochs: 1\n  epochs: 2\n", r"\(line 3, column 3\): duplicate key 'epochs'"),
        ("seed: 1\nseed: 2\n", r"\(line 2, column 1\): duplicate key 'seed'"),
        (
            "constraint:\n  tolerance: {type: linear, start: 1.0, start: 0.0}\n",
            "duplicate key 'start'",
        ),
        ("train: [1, 2\n", r"not valid YAML \(line 2, column 1\)"),
        ("a: !!python/object/apply:os.system [echo]\n", "could not determine a constructor"),
    ],
)
def test_duplicate_keys_and_bad_yaml_give_one_line_with_the_place(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "data", [b"\xff\xfe\x00\x01binary garbage", b"seed: 1\n\x80\x81\n", bytes(range(256)), b"\xc3\x28"]
)
def test_a_config_that_is_not_utf8_text(tmp_path, capsys, data):
    path = tmp_path / "binary.yaml"
    path.write_bytes(data)
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}: not a UTF-8 text file" in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------- validated before writing


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.name=mlp", "method=ace", "constraint.kind=gate"], "needs a model with an equivariant part"),
        (["model.name=mlp", "method=strict"], "needs a model with an equivariant part"),
        (["train.device=tpu"], "train.device: 'tpu' is not a device torch knows"),
        (["train.device=cuda:x"], "train.device: 'cuda:x' is not a device"),
        (["train.select=accuracy"], "train.select: 'accuracy' is not a metric of task 'toy'"),
        (
            ["model.hidden=10000000"],
            r"asked for [0-9.e+]+ GiB; sizes set above default: model.hidden=10000000",
        ),
    ],
)
def test_config_errors_found_with_the_task_leave_no_run_directory(tmp_path, capsys, overrides, message):
    out = tmp_path / "new" / "run"
    assert main(["train", TOY, "--out", str(out), *SMALL, *overrides]) == 2
    assert message.split(" ")[0] in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # nothing written: the corrected command is not "already a run"
    with pytest.raises(ConfigError, match=message):
        run(load_config(TOY, [*SMALL, *overrides]), out)
    assert not (tmp_path / "new").exists()


def test_a_growing_tolerance_from_a_measured_start_leaves_no_run_directory(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    tolerance = "constraint.tolerance={type: linear, start: auto, end: 10.0}"  # the start measures ~1
    args = [*SMALL, "method=scheduled", "constraint.kind=deviation", tolerance]
    assert main(["train", TOY, "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert (
        "constraint.tolerance: method 'scheduled' tightens the tolerance, but from the measured start" in err
    )
    assert not (tmp_path / "new").exists()


def test_a_bad_config_with_overwrite_keeps_the_old_run(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    old = {"config.yaml": "seed: 0\n", "metrics.jsonl": '{"step": 1}\n', "checkpoints/last.pt": "x"}
    for name, text in old.items():
        (out / name).write_text(text)
    assert (
        main(["train", TOY, "--out", str(out), "--overwrite", *SMALL, "model.name=mlp", "method=strict"]) == 2
    )
    assert {name: (out / name).read_text() for name in old} == old


# ------------------------------------------------------------------------------------ output paths


def test_out_that_is_a_file_or_under_a_file(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for out, message in [
        (afile, f"cannot use {afile} as the run directory: it is a file"),
        (afile / "sub" / "run", f"it lies under {afile}, which is a file"),
    ]:
        assert main(["train", TOY, "--out", str(out), *SMALL]) == 2
        err = capsys.readouterr().err
        assert err.startswith("ace: error: ") and message in err and err.count("\n") == 1
    assert afile.read_text() == "not a folder"


def test_out_that_cannot_be_written(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and access(p, mode))  # chmod: root
    for out in (locked, locked / "new" / "run"):
        assert main(["train", TOY, "--out", str(out), *SMALL]) == 2
        assert f"{locked} is not writable" in capsys.readouterr().err
    assert list(locked.iterdir()) == []
    if Path("/proc/self").is_dir():  # a folder nobody can create, not even root
        assert main(["train", TOY, "--out", "/proc/ace-run", *SMALL]) == 2
        assert "ace: error: cannot write the run directory /proc/ace-run" in capsys.readouterr().err


def test_export_to_a_path_that_cannot_be_written(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, message in [
        (afile / "model.pt", f"cannot use {afile} as the folder of the exported model: it is a file"),
        (afile / "sub" / "model.pt", f"lies under {afile}, which is a file"),
        (tmp_path, "it is a directory"),
    ]:
        with pytest.raises(OutputError, match=message):
            ace.cli._export(
                type("Args", (), {"run_dir": str(tmp_path), "out": str(out), "equivariant": False})
            )
        assert main(["export", str(tmp_path), str(out)]) == 2
        assert capsys.readouterr().err.startswith("ace: error: ")


def test_cache_dir_that_is_a_file_unwritable_or_taken_by_a_folder(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match=f"data.cache_dir: .*{afile} is a file, not a folder"):
        cache_path(str(afile), "p-", {"a": 1})
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        cache_path(str(afile / "sub"), "p-", {"a": 1})
    taken = cache_path(str(tmp_path / "cache"), "p-", {"a": 1})
    taken.mkdir(parents=True)
    with pytest.raises(ConfigError, match="is a folder where the cache file should be"):
        cache_path(str(tmp_path / "cache"), "p-", {"a": 1})
    with pytest.raises(ConfigError, match=f"data.cache_dir: cannot write the data cache {taken}"):
        write_cache(taken, {"a": 1}, {"x": torch.zeros(2)})
    assert [p.name for p in taken.parent.iterdir()] == [taken.name]  # no temporary file left
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path / "ro" and access(p, mode))
    (tmp_path / "ro").mkdir()
    with pytest.raises(ConfigError, match="is not writable"):
        cache_path(str(tmp_path / "ro"), "p-", {"a": 1})


# ------------------------------------------------------------------------------------ the Python API


def trainer(model=None, loss=nn.functional.mse_loss, **kw):
    model = model or nn.Linear(2, 2)
    kw.setdefault("optimizer", torch.optim.SGD(model.parameters(), lr=0.1))
    return ace.Trainer(model, loss, progress=False, **kw)


def batches(target_dim=2, n=8):
    return DataLoader(TensorDataset(torch.randn(n, 2), torch.randn(n, target_dim)), batch_size=4)


@pytest.mark.parametrize(
    "loss, message",
    [
        (lambda out, y: (out - y) ** 2, r"the loss must return a scalar tensor, got shape \(4, 2\)"),
        (lambda out, y: torch.zeros(0), r"got shape \(0,\)"),
        (lambda out, y: 1.0, "got float"),
        (lambda out, y: [(out - y).pow(2).mean()], "got list"),
    ],
)
def test_a_loss_that_is_not_a_scalar(loss, message):
    t = trainer(loss=loss)
    with pytest.raises(ValueError, match=message):
        t.fit(batches(), epochs=1, print_summary=False)
    assert t.step == 0


@pytest.mark.filterwarnings("ignore:Using a target size")  # mse_loss warns before it fails
def test_a_target_that_does_not_fit_the_output():
    with pytest.raises(ValueError, match=r"target shape \(B, 5\) does not match model output \(B, 2\)"):
        trainer().fit(batches(target_dim=5), epochs=1, print_summary=False)
    with pytest.raises(ValueError, match=r"target shape \(3, 2\) does not match model output \(4, 2\)"):
        trainer().train_step((torch.randn(4, 2), torch.randn(3, 2)))


@pytest.mark.parametrize("key", ["init", "lr", "kp", "ki", "penalty_coefficient"])
def test_non_finite_dual_settings(key):
    for value in (math.nan, math.inf):
        with pytest.raises(ValueError, match=f"dual.{key} must be"):
            ace.DualSettings(**{key: value})


@pytest.mark.parametrize(
    "kw", [{"epochs": 0}, {"epochs": -1}, {"max_steps": 0}, {"max_steps": -5}, {"epochs": 1.5}]
)
def test_fit_with_nothing_to_do_is_refused(kw):
    t = trainer()
    name = next(iter(kw))
    with pytest.raises(ValueError, match=f"fit\\(\\): {name} must be an integer >= 1"):
        t.fit(batches(), print_summary=False, **kw)
    assert t.step == 0 and t.history == []


def test_an_optimizer_of_another_model_is_refused():
    with pytest.raises(ValueError, match="the optimizer holds none of the model's parameters"):
        trainer(optimizer=torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))


def test_a_log_dir_that_holds_a_run_is_refused_unless_resume_or_overwrite(tmp_path):
    torch.manual_seed(0)
    t = trainer(log_dir=tmp_path, log_every=1)
    t.fit(batches(), epochs=1, print_summary=False)
    t.close()
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"already holds a run \(.*last.pt.*\); pass resume=True"):
        trainer(log_dir=tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == before
    t = trainer(log_dir=tmp_path, resume=True, log_every=1)
    t.load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    t.fit(batches(), epochs=2, print_summary=False)
    t.close()
    assert [r["step"] for r in ace.runs.metrics.read_metrics(tmp_path / "metrics.jsonl") if "loss" in r] == [
        1,
        2,
        3,
        4,
    ]
    t = trainer(log_dir=tmp_path, overwrite=True)
    t.close()
    assert not (tmp_path / "summary.json").exists() and not list((tmp_path / "checkpoints").glob("*.pt"))
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    trainer(log_dir=tmp_path).close()  # an empty log is no run


# --------------------------------------------------------------------------------------- bad batches


class TwoFields(nn.Module):
    def __init__(self, out=2):
        super().__init__()
        self.linear = nn.Linear(4, out)

    def forward(self, pos, vel):
        return self.linear(torch.cat([pos, vel], -1))


def field_trainer(model=None):
    model = model or TwoFields()
    return ace.Trainer(
        model,
        nn.functional.mse_loss,
        torch.optim.SGD(model.parameters(), lr=0.1),
        symmetry=ace.Symmetry(ace.groups.SO2(), inputs={"pos": "vector", "vel": "vector"}, output="vector"),
        progress=False,
    )


def fields(n=4, **kw):
    return {"pos": torch.randn(n, 2), "vel": torch.randn(n, 2), **kw}


BAD_BATCHES = {
    "missing field": (
        ({"pos": torch.randn(4, 2)}, torch.randn(4, 2)),
        r"field 'vel' \(kind 'vector', shape \(\.\.\., 2\)\) is missing",
    ),
    "wrong last dim": (
        (fields(pos=torch.randn(4, 3)), torch.randn(4, 2)),
        r"field 'pos': kind 'vector' .*needs last dim 2",
    ),
    "wrong batch dim": (
        (fields(vel=torch.randn(3, 2)), torch.randn(4, 2)),
        r"field 'vel': expected a leading batch dim of 4 .*got shape \(3, 2\)",
    ),
    "float64 inputs": (
        (fields(pos=torch.randn(4, 2).double()), torch.randn(4, 2)),
        "field 'pos' has dtype torch.float64, but the model's parameters are torch.float32",
    ),
    "empty batch": ((fields(n=0), torch.randn(0, 2)), "empty batch in step 1"),
    "not a pair": (torch.randn(4, 2), r"must be an \(inputs, target\) pair"),
    "not a dict": (
        (torch.randn(4, 2), torch.randn(4, 2)),
        "need a dict or a torch_geometric Data, got Tensor",
    ),
}


@pytest.mark.parametrize("name", list(BAD_BATCHES))
def test_bad_batch_names_the_field_and_shape(name):
    batch, message = BAD_BATCHES[name]
    trainer = field_trainer()
    before = [p.clone() for p in trainer.model.parameters()]
    with pytest.raises((ValueError, TypeError), match=message):
        trainer.train_step(batch)
    assert trainer.step == 0 and all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_output_that_does_not_fit_its_representation():
    with pytest.raises(
        ValueError, match=r"field 'output': kind 'vector' .*needs last dim 2, got shape \(4, 3\)"
    ):
        field_trainer(TwoFields(out=3)).train_step((fields(), torch.randn(4, 3)))


def test_empty_loaders_are_refused():
    trainer = field_trainer()
    empty = DataLoader(TensorDataset(torch.zeros(0, 2), torch.zeros(0, 2)), batch_size=4)
    with pytest.raises(ValueError, match="training loader is empty"):
        trainer.fit(empty, epochs=1)
    with pytest.raises(ValueError, match="empty loader"):
        trainer.evaluate(empty)


# --------------------------------------------------------------------------------------- malformed configs


@pytest.mark.parametrize(
    "text, message",
    [
        ("- just\n- a list\n", "a config is a mapping of sections, got list"),
        ("train: [1, 2\n", "not valid YAML"),
        ("train: 5\n", "train: expected a mapping, got 5"),
        ("task: [toy]\n", "task: expected a mapping with 'name'"),
        ("schema: 2\n", "schema: this config is for schema 2, newer"),
        ("schema: two\n", "schema: expected int"),
        ("train: {on_nan: explode}\n", "train.on_nan: 'explode' is not one of"),
        ("dual: {max_multiplier: 0}\n", "dual.max_multiplier: must be > 0 or null"),
        ("dual: {max_multiplier: big}\n", "dual.max_multiplier: expected float"),
        ("train: {threads: 0}\n", "train.threads: must be > 0"),
        ("train: {max_steps: 0}\n", "train.max_steps: must be > 0"),
        ("train: {epochs: 0}\n", "0 epochs and no train.max_steps"),
        ("train: {checkpoint_every: 0}\n", "train.checkpoint_every: must be > 0"),
        ("optim: {grad_clip: -1}\n", "optim.grad_clip: must be > 0"),
        ("optim: {name: lbfgs}\n", "optim.name: 'lbfgs' is not one of"),
        ("log: {progress: maybe}\n", "log.progress: expected bool"),
        ("log: {evry: 5}\n", "unknown config key 'log.evry' .did you mean 'log.every'"),
        ("train: {on_nans: skip}\n", "did you mean 'train.on_nan'"),
        ("dual: {lr: 0}\n", "dual.lr: must be > 0"),
    ],
)
def test_malformed_config_file(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_config_file_and_cli_exit_codes(tmp_path, capsys):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    assert cli("train", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "run")) == 2
    assert cli("train", TOY, "--out", str(tmp_path / "run"), "optim.lrr=0.1") == 2
    assert "optim.lrr" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_ace_heldout_on_a_deviation_constraint_is_refused_before_anything_is_written(tmp_path, capsys):
    assert main(["train", str(TOY), "--out", str(tmp_path / "run"), "method=ace_heldout"]) == 2
    assert "method 'ace_heldout' judges each gated layer's branch" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
