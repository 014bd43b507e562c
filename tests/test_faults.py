"""Fault suite: kills, signals, a full disk, NaNs, runaway multipliers, hostile files and bad batches.

Every kill runs the real CLI in a subprocess; the ``RUNNER`` below patches a hook to SIGKILL
the process at an exact point, so each case is deterministic. After ``--resume`` the final state must
equal an uninterrupted run bit for bit (CPU, one thread).
"""

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ace
from ace.cli import main
from ace.config import ConfigError, load_config
from ace.config.run_config import config_changes
from ace.experiment import run
from ace.runs import CheckpointError, MetricsLog, RunDirError, read_metrics
from ace.train import Interrupted, NonFiniteError, Trainer
from ace.train.faults import NanPolicy

ROOT = Path(__file__).parent.parent
TOY = str(ROOT / "configs" / "toy.yaml")
# plain ascent in units of the loss (ace < 0.2's defaults): the multiplier grows without bound when infeasible
OLD_DUAL = ace.DualSettings(formulation="lagrangian", update="simultaneous", lr=1.0, scale="none")
# 4 steps per epoch, 3 epochs, a checkpoint after each epoch (steps 4, 8, 12)
ARGS = [
    "train.epochs=3",
    "data.train_size=64",
    "data.val_size=16",
    "data.test_size=16",
    "train.batch_size=16",
    "model.hidden=16",
    "log.every=1",
    "log.progress=false",
    "train.threads=1",
]

RUNNER = r"""
import os, signal, sys, time
import torch
from ace.cli import main
from ace.constrained.primal import PrimalSide

point, at = sys.argv[1], int(sys.argv[2])
saving = {}

def die():
    os.kill(os.getpid(), signal.SIGKILL)

primal_step, steps = PrimalSide.step, [0]
def patched_primal_step(self, *args):
    primal_step(self, *args)  # the parameters have moved: the step is half done
    steps[0] += 1
    if point == "slow":
        time.sleep(0.1)
    if point == "step" and steps[0] == at:
        die()
PrimalSide.step = patched_primal_step

save, replace = torch.save, os.replace
def patched_save(obj, f, *args, **kwargs):
    if not (isinstance(obj, dict) and "format" in obj):  # best_*.pt weights: not the trainer checkpoint
        return save(obj, f, *args, **kwargs)
    saving["step"] = obj.get("step")
    if point == "save" and saving["step"] == at:
        f.write(b"PK\x03\x04 torn checkpoint")
        f.flush()
        die()
    return save(obj, f, *args, **kwargs)
torch.save = patched_save

def patched_replace(src, dst):
    replace(src, dst)
    if point == "rename" and saving.get("step") == at and str(dst).endswith("previous.pt"):
        die()  # last.pt was moved away, the new one is not in place yet
os.replace = patched_replace

sys.exit(main(sys.argv[3:]))
"""


def runner(point, at, out, wait=True, extra=()):
    command = [sys.executable, "-c", RUNNER, point, str(at), "train", TOY, "--out", str(out), *ARGS, *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if wait:
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()  # train.threads=1 must not slow down the rest of the test session
    yield
    torch.set_num_threads(threads)


def cli(*args):
    return main(list(args))


def resume(out, *extra):
    return cli("train", TOY, "--out", str(out), "--resume", *ARGS, *extra)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    assert cli("train", TOY, "--out", str(out), *ARGS) == 0
    return out


def records(out):
    return [r for r in read_metrics(out / "metrics.jsonl") if "event" not in r]


def checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_run(out, reference):
    a, b = checkpoint(out / "checkpoints" / "last.pt"), checkpoint(reference / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 12
    for key in b["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for name in b["cmp"]["multipliers"]:
        assert torch.equal(a["cmp"]["multipliers"][name]["weight"], b["cmp"]["multipliers"][name]["weight"])
    got = records(out)
    assert got == records(reference)
    assert [r["step"] for r in got if "loss" in r] == list(range(1, 13))  # each step once, in order
    assert json.loads((out / "summary.json").read_text())["steps"] == 12
    assert not list((out / "checkpoints").glob("*.tmp"))


# --------------------------------------------------------------------------------------- kills and signals

#: name -> (runner hook, step); "slow" runs are signalled from outside, some time after their first checkpoint
SCENARIOS = {
    "step": ("step", 10),  # SIGKILL mid-step, checkpoints of steps 4 and 8 on disk
    "save": (
        "save",
        4,
    ),  # SIGKILL inside the first checkpoint write: a torn last.pt.tmp, no checkpoint at all
    "rename": ("rename", 8),  # SIGKILL after last.pt became previous.pt, before the new last.pt is in place
    "outside SIGKILL": ("slow", 0),  # as a user would: `kill -9` a running `ace train`
    "outside SIGTERM": ("slow", 0),
}
OUTSIDE = {"outside SIGKILL": (signal.SIGKILL, 0.25), "outside SIGTERM": (signal.SIGTERM, 0.15)}


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Every scenario's subprocess, started at once (importing torch dominates; the cores share it)."""
    root = tmp_path_factory.mktemp("killed")
    outs = {name: root / name.replace(" ", "_") / "run" for name in SCENARIOS}
    procs = {name: runner(*SCENARIOS[name], outs[name], wait=False) for name in SCENARIOS}
    due, deadline = {}, time.monotonic() + 240
    pending = dict(OUTSIDE)
    while pending:
        assert time.monotonic() < deadline, "the runs did not reach their first checkpoint"
        for name, (sig, delay) in list(pending.items()):
            if name not in due and (outs[name] / "checkpoints" / "last.pt").exists():
                due[name] = time.monotonic() + delay
            if name in due and time.monotonic() >= due[name]:
                procs[name].send_signal(sig)
                del pending[name]
        time.sleep(0.01)
    results = {}
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=240)
        results[name] = (outs[name], proc.returncode, stderr)
    return results


@pytest.mark.parametrize("name", ["step", "save", "rename", "outside SIGKILL"])
def test_sigkill_then_resume_equals_the_uninterrupted_run(killed, reference, name):
    out, code, stderr = killed[name]
    assert code == -signal.SIGKILL, stderr
    folder = out / "checkpoints"
    if name == "rename":  # resume falls back to previous.pt
        assert not (folder / "last.pt").exists() and checkpoint(folder / "previous.pt")["step"] == 4
    if name == "save":  # resume starts again from step 0
        assert not (folder / "last.pt").exists() and (folder / "last.pt.tmp").exists()
    if name == "step":
        assert checkpoint(folder / "last.pt")["step"] == 8
        assert max(r["step"] for r in read_metrics(out / "metrics.jsonl")) == 9
        with open(out / "metrics.jsonl", "a") as f:  # as if killed inside a write: resume must cut it
            f.write('{"step": 10, "loss": 0.12')
    assert resume(out) == 0
    assert_same_run(out, reference)


def test_sigterm_saves_a_checkpoint_exits_130_and_resumes(killed, reference):
    out, code, stderr = killed["outside SIGTERM"]
    assert code == 130, stderr
    step = checkpoint(out / "checkpoints" / "last.pt")["step"]
    assert 4 <= step < 12
    assert f"ace: interrupted: stopped by a signal after step {step}; checkpoint saved to" in stderr
    assert "--resume" in stderr
    assert resume(out) == 0
    assert_same_run(out, reference)


# --------------------------------------------------------------------------------------- a toy trainer


class Net(nn.Module):
    """A plain non-equivariant map of planar vectors (for DeviationConstraint under SO(2))."""

    def __init__(self, out=2):
        super().__init__()
        self.linear = nn.Linear(2, out)

    def forward(self, x):
        return self.linear(x)


def loader(n=32, batch=8):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g)), batch)


def make_trainer(log_dir=None, loss=nn.functional.mse_loss, model=None, constraints=None, **kw):
    torch.manual_seed(0)
    model = model or Net()
    kw.setdefault("optimizer", torch.optim.SGD(model.parameters(), lr=0.1))
    return ace.Trainer(
        model,
        loss,
        symmetry=ace.Symmetry(ace.groups.SO2(), inputs="vector", output="vector"),
        constraints=[ace.DeviationConstraint(tolerance=0.0)] if constraints is None else constraints,
        log_dir=log_dir,
        log_every=1,
        progress=False,
        **kw,
    )


class NaNAt:
    """A loss that is NaN the first time each of ``steps`` (counted from 1) runs; set ``.trainer`` first."""

    def __init__(self, *steps):
        self.pending = list(steps)
        self.trainer = None

    def __call__(self, output, target):
        value = nn.functional.mse_loss(output, target)
        if self.pending and self.trainer.step + 1 == self.pending[0]:
            self.pending.pop(0)
            return value * float("nan")
        return value


def nan_trainer(steps, log_dir=None, **kw):
    loss = NaNAt(*steps)
    loss.trainer = make_trainer(log_dir, loss=loss, **kw)
    return loss.trainer


def events(trainer):
    return [r for r in trainer.history if "event" in r]


def test_sigint_in_the_python_api_without_a_run_directory():
    trainer = make_trainer()
    handler = signal.getsignal(signal.SIGINT)

    def interrupting(output, target):
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return nn.functional.mse_loss(output, target)

    trainer.loss_fn = interrupting
    with pytest.raises(Interrupted, match="after step 3 .no log_dir: no checkpoint saved"):
        trainer.fit(loader(), epochs=2, print_summary=False)
    assert signal.getsignal(signal.SIGINT) is handler  # restored


class SignalDuring:
    """A loader that sends ``sig`` to this process while it is read (say, during the final test pass)."""

    def __init__(self, data, sig):
        self.data, self.sig = data, sig

    def __len__(self):
        return len(self.data)

    def __iter__(self):
        if self.sig is not None:
            os.kill(os.getpid(), self.sig)
            self.sig = None
        return iter(self.data)


def test_sigterm_during_the_final_test_pass_saves_stops_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(signal, "SIGTERM", signal.SIGTERM)
    fallback = signal.signal(signal.SIGTERM, lambda *a: None)  # before the fix the signal lands here, unseen
    try:
        trainer = make_trainer(tmp_path)
        with pytest.raises(Interrupted, match="during the final evaluation after step 8; checkpoint saved"):
            trainer.fit(loader(), loader(), epochs=2, test_loader=SignalDuring(loader(), signal.SIGTERM))
    finally:
        signal.signal(signal.SIGTERM, fallback)
    trainer.close()
    assert (
        not (tmp_path / "summary.json").exists()
        and checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 8
    )
    resumed = make_trainer(tmp_path, resume=True)
    resumed.load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    resumed.truncate_records(events=False)
    resumed.fit(loader(), loader(), epochs=2, test_loader=loader(), print_summary=False)
    resumed.close()
    tests = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "test/loss" in r]
    assert len(tests) == 1 and (tmp_path / "summary.json").exists()


def test_resuming_a_finished_run_writes_no_record_twice(tmp_path, reference):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    assert resume(out) == 0  # nothing left to train: the test pass runs again and replaces its record
    assert records(out) == records(reference)


def test_multiplier_ceiling_events_are_not_written_again_after_a_resume(tmp_path):
    def ceiling_trainer(**kw):
        return make_trainer(tmp_path, model=ConstantField(), dual=OLD_DUAL, max_multiplier=2.0, **kw)

    with pytest.warns(UserWarning, match="reached the ceiling"):
        ceiling_trainer().fit(loader(), epochs=1, print_summary=False)  # the ceiling comes before step 4
    for kill_at in (4, 8):  # resumed twice from a checkpoint written after the event
        trainer = ceiling_trainer(resume=True)
        trainer.load_checkpoint(tmp_path / "checkpoints" / "last.pt")
        trainer.truncate_records(events=False)
        trainer.fit(loader(), max_steps=kill_at + 4, print_summary=False)
        trainer.close()
    logged = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("event") == "multiplier_ceiling"]
    assert len(logged) == 1


# --------------------------------------------------------------------------------------- disk full


@pytest.mark.parametrize(
    "raised", ["OSError", "RuntimeError"]
)  # torch's writer says RuntimeError at some sizes
def test_disk_full_during_a_checkpoint_keeps_the_good_ones(tmp_path, monkeypatch, raised):
    trainer = make_trainer(tmp_path)
    trainer.fit(loader(), epochs=2, print_summary=False)
    folder = tmp_path / "checkpoints"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert set(before) == {"last.pt", "previous.pt"}

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"\0" * 100)
        if raised == "RuntimeError":
            raise RuntimeError(
                "[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0 No space left"
            )
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(
        CheckpointError, match=r"cannot write checkpoint .*last.pt: .*No space left.*unchanged"
    ):
        trainer.save_checkpoint()
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no torn .tmp either
    make_trainer().load_checkpoint(folder / "last.pt")


def test_disk_full_in_a_cli_run_exits_1_and_resume_completes(tmp_path, reference, monkeypatch):
    out = tmp_path / "run"
    save = torch.save

    def full_at_step_8(obj, f, *args, **kwargs):
        if obj["step"] == 8:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_at_step_8)
    assert cli("train", TOY, "--out", str(out), *ARGS) == 1
    monkeypatch.undo()
    assert checkpoint(out / "checkpoints" / "last.pt")["step"] == 4
    assert resume(out) == 0
    assert_same_run(out, reference)


def test_disk_full_while_appending_records_is_one_line(tmp_path, monkeypatch, capsys):
    write = MetricsLog.write

    def full_at_step_6(self, record):
        if record.get("step") == 6:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(self, record)

    monkeypatch.setattr(MetricsLog, "write", full_at_step_6)
    assert cli("train", TOY, "--out", str(tmp_path / "run"), *ARGS) == 1
    assert capsys.readouterr().err == "ace: error: No space left on device\n"
    assert checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 4


# --------------------------------------------------------------------------------------- NaN policies


def test_nan_stop_names_quantity_and_step_and_keeps_the_checkpoint(tmp_path):
    trainer = nan_trainer([7], tmp_path)
    with pytest.raises(NonFiniteError, match=r"non-finite loss in step 7 \(train.on_nan=stop\).*last.pt"):
        trainer.fit(loader(), epochs=3, print_summary=False)
    assert checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 4
    assert events(trainer)[-1] == {"step": 7, "event": "non_finite", "quantity": "loss", "policy": "stop"}
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["event"] == "non_finite"


@pytest.mark.parametrize(
    "quantity, setup",
    [
        ("constraint 'deviation'", "deviation"),
        ("gradient", "gradient"),
        ("multiplier", "multiplier"),
    ],
)
def test_nan_stop_detects_each_quantity(monkeypatch, quantity, setup):
    loss = nn.functional.mse_loss
    if setup == "deviation":
        deviation = ace.constrained.constraints.equivariance_deviation
        monkeypatch.setattr(
            ace.constrained.constraints,
            "equivariance_deviation",
            lambda *a, **k: deviation(*a, **k) * float("inf"),
        )
    elif setup == "gradient":  # d sqrt(s)/ds = inf at s = 0, times ds/dout = 0: a NaN gradient
        loss = lambda out, y: nn.functional.mse_loss(out, y) + (out * 0).sum().sqrt()  # noqa: E731
    trainer = make_trainer(loss=loss)
    if setup == "multiplier":
        poison_dual_step(trainer, {1}, monkeypatch)
    with pytest.raises(NonFiniteError, match=f"non-finite {quantity} in step 1 .*no checkpoint was written"):
        trainer.fit(loader(), epochs=1, print_summary=False)


def poison_dual_step(trainer, at, monkeypatch):
    """The dual step of the steps in ``at`` (counted from 1) leaves an Inf multiplier."""
    dual_step = ace.constrained.multipliers.dual_step

    def poisoned(optimizer, constraints, violations, dual):
        dual_step(optimizer, constraints, violations, dual)
        if trainer.step + 1 in at:
            for c in constraints.values():
                c.multiplier.weight.data.fill_(float("inf"))

    monkeypatch.setattr(ace.constrained.multipliers, "dual_step", poisoned)


def test_nan_skip_undoes_a_bad_dual_step(monkeypatch):
    trainer = make_trainer(on_nan="skip")
    poison_dual_step(trainer, {2, 3}, monkeypatch)
    trainer.fit(loader(), epochs=1, print_summary=False)
    assert [e["quantity"] for e in events(trainer)] == ["multiplier", "multiplier"]
    multipliers = [r["constraint/deviation/multiplier"] for r in trainer.history if "loss" in r]
    assert len(multipliers) == 2 and all(map(math.isfinite, multipliers))  # steps 1 and 4
    assert torch.isfinite(trainer.multipliers()["deviation"]).all()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_the_step_check_reads_the_numbers_and_forgets_a_bad_gradient_after_reporting_it():
    """One sync reads the small quantities and flags a non-finite gradient once: the flag persists between
    steps (no allocation per step), so it must be reset when read, or every later step would be dropped."""
    from ace.constrained.step_check import StepCheck

    weights = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))]
    check = StepCheck(weights, torch.device("cpu"))
    quantities = {"loss": [torch.tensor(0.5)], "multiplier": [torch.tensor([1.0, -2.0])]}
    for grads, finite in [
        ((1.0, 2.0), True),
        ((math.nan, 2.0), False),
        ((1.0, math.inf), False),
        ((1.0, 2.0), True),
    ]:
        for w, g in zip(weights, grads):
            w.grad = torch.full_like(w, g)
        numbers, ok = check(quantities)
        assert numbers == {"loss": [0.5], "multiplier": [1.0, -2.0]} and ok is finite
        for w, g in zip(weights, grads):  # the check changes no value
            torch.testing.assert_close(w.grad, torch.full_like(w, g), rtol=0, atol=0, equal_nan=True)


def test_nan_rollback_reloads_halves_the_lr_and_finishes(tmp_path):
    # the same step fails twice: two rollbacks to the step-4 checkpoint
    trainer = nan_trainer([7, 7], tmp_path, on_nan="rollback")
    summary = trainer.fit(loader(), epochs=3, print_summary=False)
    assert summary["steps"] == 12 and trainer.state.rollbacks == 2
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)  # halved each time
    assert [(e["step"], e["policy"]) for e in events(trainer)] == [(7, "rollback"), (7, "rollback")]
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 13))  # the records of the undone steps 5-6 are gone
    assert checkpoint(tmp_path / "checkpoints" / "last.pt")["rollbacks"] == 2


def test_nan_rollback_gives_up_and_needs_a_checkpoint(tmp_path):
    trainer = nan_trainer([7] * 5, tmp_path, on_nan="rollback", max_rollbacks=2)
    with pytest.raises(NonFiniteError, match="rollback gave up after 2 rollbacks"):
        trainer.fit(loader(), epochs=3, print_summary=False)
    trainer = nan_trainer([2], on_nan="rollback")
    with pytest.raises(
        NonFiniteError, match="step 2 .rollback needs a checkpoint.; no checkpoint was written"
    ):
        trainer.fit(loader(), epochs=1, print_summary=False)


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nan_through_a_config(tmp_path, capsys, policy):
    out = tmp_path / "run"  # plain SGD with a huge learning rate diverges within a few steps
    code = cli(
        "train", TOY, "--out", str(out), *ARGS, "optim.name=sgd", "optim.lr=1.0e30", f"train.on_nan={policy}"
    )
    assert code == 1  # skip drops the non-finite steps, but the weights are gone: the run is not finished
    assert "ace: error: non-finite" in capsys.readouterr().err
    assert read_metrics(out / "metrics.jsonl")[-1]["event"] == "non_finite"
    assert not (out / "summary.json").exists() and not (out / "checkpoints" / "last.pt").exists()
    if policy == "skip":
        assert any(r.get("policy") == "skip" for r in read_metrics(out / "metrics.jsonl"))


class FailingEval:
    """The trainer's evaluations with a NaN loss at the evaluations after the steps in ``steps``."""

    def __init__(self, trainer, *steps):
        self.evaluate, self.steps, self.trainer = trainer.validation.evaluate, list(steps), trainer
        trainer.validation.evaluate = self

    def __call__(self, loader, *args, **kwargs):
        scores = self.evaluate(loader, *args, **kwargs)
        if self.trainer.step in self.steps:
            self.steps.remove(self.trainer.step)
            scores["loss"] = float("nan")
        return scores


@pytest.mark.parametrize("policy", ["stop", "skip", "rollback"])
def test_a_non_finite_validation_writes_no_checkpoint(tmp_path, policy):
    trainer = make_trainer(tmp_path, on_nan=policy)
    FailingEval(trainer, 8)
    if policy == "rollback":  # back to the step-4 checkpoint with half the learning rate, then on to the end
        summary = trainer.fit(loader(), loader(), epochs=3, print_summary=False)
        assert summary["steps"] == 12 and trainer.state.rollbacks == 1
        assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05)
        assert [e["quantity"] for e in events(trainer)] == ["val loss"]
        return
    saved = []
    save = trainer.save_checkpoint
    trainer.save_checkpoint = lambda path=None: (saved.append(trainer.step), save(path))[1]
    if policy == "stop":
        with pytest.raises(NonFiniteError, match=r"non-finite val loss after step 8 .*last.pt"):
            trainer.fit(loader(), loader(), epochs=3, print_summary=False)
        assert saved == [4]
    else:  # skip: no checkpoint of that epoch, the run goes on and ends well
        trainer.fit(loader(), loader(), epochs=3, print_summary=False)
        assert saved == [4, 12, 12]
        assert trainer.state.best["val/loss"]["step"] != 8
    assert events(trainer)[0] == {"step": 8, "event": "non_finite", "quantity": "val loss", "policy": policy}


@pytest.mark.parametrize("policy", ["stop", "skip", "rollback"])
def test_weights_that_become_non_finite_without_a_non_finite_loss(tmp_path, policy):
    # an infinite learning rate: the one step sees finite weights, the model after it is NaN
    model = Net()
    trainer = make_trainer(tmp_path, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=math.inf))
    trainer.nan_policy = NanPolicy(policy)
    with pytest.raises(
        NonFiniteError,
        match=r"non-finite (val loss|weights) after step 1 \((train.on_nan|rollback needs|at the end)",
    ):
        trainer.fit(loader(n=8), loader(n=8), epochs=1, print_summary=False)
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "checkpoints" / "last.pt").exists()


def test_a_non_finite_test_evaluation_is_not_a_finished_run(tmp_path):
    trainer = make_trainer(tmp_path, on_nan="skip")
    FailingEval(trainer, 8)  # the last step's evaluations are the final validation and the test
    trainer.validation.evaluate.steps = [8, 8]
    with pytest.raises(NonFiniteError, match="non-finite val loss after step 8 .at the end of the run"):
        trainer.fit(loader(), loader(), epochs=2, test_loader=loader(), print_summary=False)
    assert not (tmp_path / "summary.json").exists()


# --------------------------------------------------------------------------------------- multiplier ceiling


class ConstantField(nn.Module):
    """x -> A x + c with c fixed: D = E||c - g c||^2 > 0 whatever A is, so D <= 0 is infeasible."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2, bias=False)
        self.register_buffer("c", torch.tensor([1.0, 0.0]))

    def forward(self, x):
        return self.linear(x) + self.c


def test_infeasible_constraint_hits_the_multiplier_ceiling(tmp_path):
    trainer = make_trainer(tmp_path, model=ConstantField(), dual=OLD_DUAL, max_multiplier=2.0)
    with pytest.warns(UserWarning, match="reached the ceiling 2 .*may be infeasible"):
        trainer.fit(loader(), epochs=3, print_summary=False)
    assert trainer.multipliers()["deviation"].item() == 2.0
    logged = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("event") == "multiplier_ceiling"]
    assert len(logged) == 1 and logged[0]["constraint"] == "deviation"
    assert all(r["constraint/deviation/multiplier"] <= 2.0 for r in trainer.history if "loss" in r)


def test_max_multiplier_through_a_config(tmp_path):
    cfg = load_config(TOY, [*ARGS, "method=ace", "dual.max_multiplier=1.0e-3", "dual.lr=100.0"])
    with pytest.warns(UserWarning, match="ceiling 0.001"):
        run(cfg, tmp_path / "run")
    assert any(
        r.get("event") == "multiplier_ceiling" for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
    )


# --------------------------------------------------------------------------------------- hostile files


class Payload:
    """Unpickling this would create a file: weights_only must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def foreign_files(tmp_path):
    good = tmp_path / "good.pt"
    make_trainer().save_checkpoint(good)
    files = {
        "truncated": (good.read_bytes()[: good.stat().st_size // 2], "cannot read checkpoint"),
        "garbage": (b"definitely not a checkpoint", "cannot read checkpoint"),
        "empty": (b"", "cannot read checkpoint"),
    }
    for name, obj, message in [
        ("no_format", {"model": {}}, "not an ace trainer checkpoint of format 1 .got format None"),
        ("newer_format", {"format": 99}, "got format 99"),
        ("tensor", torch.zeros(3), "got format Tensor"),
        (
            "pickle",
            {"format": 1, "x": Payload(tmp_path / "pwned")},
            "(?s)cannot read checkpoint.*Weights only load failed",
        ),
        ("other_model", {**checkpoint(good), "model": {"w": torch.zeros(1)}}, "does not fit this trainer"),
    ]:
        torch.save(obj, tmp_path / "tmp.pt")
        files[name] = ((tmp_path / "tmp.pt").read_bytes(), message)
    return files


def test_hostile_and_broken_checkpoints_fail_clearly_and_run_no_code(tmp_path):
    for name, (data, message) in foreign_files(tmp_path).items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(data)
        trainer = make_trainer()
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        with pytest.raises(CheckpointError, match=message):
            trainer.load_checkpoint(path)
        if name != "other_model":  # a readable but foreign file changes nothing
            assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items()), name
    assert not (tmp_path / "pwned").exists()


def test_a_data_cache_with_a_flipped_bit_is_regenerated(tmp_path):
    from ace.tasks.cache import read_cache, write_cache

    path, params = tmp_path / "data.pt", {"size": 4}
    content = {
        "x": torch.arange(8.0).reshape(4, 2),
        "splits": (torch.ones(4), torch.zeros(4, dtype=torch.long)),
    }
    write_cache(path, params, content)
    assert read_cache(path, params, lambda c: None)["splits"][1].dtype == torch.long
    stored = torch.load(path, weights_only=True)
    stored["x"].view(torch.int32)[3, 1] ^= 1  # the lowest bit of one number: same shapes, same parameters
    torch.save(stored, path)
    with pytest.warns(UserWarning, match="does not match its checksum"):
        assert read_cache(path, params, lambda c: None) is None
    del stored["sha256"]  # a file of an older ace, or written by hand
    torch.save(stored, path)
    with pytest.warns(UserWarning, match="regenerating data"):
        assert read_cache(path, params, lambda c: None) is None


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.filterwarnings("ignore:skipping")  # the CLI's resume warns for each damaged file, as it should
@pytest.mark.parametrize("damage", ["truncated", "pickle", "no_format"])
def test_resume_refuses_when_no_checkpoint_is_good_and_touches_nothing(tmp_path, damage):
    out = tmp_path / "run"
    data, _ = foreign_files(tmp_path)[damage]
    assert cli("train", TOY, "--out", str(out), *ARGS, "train.epochs=2") == 0
    (out / "checkpoints" / "last.pt").write_bytes(data)
    (out / "checkpoints" / "previous.pt").write_bytes(data)
    before = snapshot(out)
    assert resume(out) == 1  # nothing good to resume from: a clear error, nothing touched
    assert snapshot(out) == before
    with (
        pytest.raises(CheckpointError, match="no readable checkpoint"),
        pytest.warns(UserWarning, match="skipping"),
    ):
        run(load_config(TOY, ARGS), out, resume=True)
    assert snapshot(out) == before
    assert not (tmp_path / "pwned").exists()


def test_resume_falls_back_to_previous_when_last_is_damaged(tmp_path, reference, monkeypatch):
    out = tmp_path / "run"
    train_step = Trainer.train_step

    def killed_at_step_10(self, batch, **kw):
        if self.step == 9:
            raise KeyboardInterrupt  # stands for a kill: checkpoints of steps 4 and 8 are on disk
        return train_step(self, batch, **kw)

    monkeypatch.setattr(Trainer, "train_step", killed_at_step_10)
    with pytest.raises(KeyboardInterrupt):
        run(load_config(TOY, ARGS), out)
    monkeypatch.undo()
    (out / "checkpoints" / "last.pt").write_bytes(b"torn")  # say, a disk error
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint .*last.pt"):
        run(load_config(TOY, ARGS), out, resume=True)  # from previous.pt, step 4
    assert_same_run(out, reference)


def test_config_from_a_newer_schema_touches_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli("train", TOY, "--out", str(out), *ARGS, "train.epochs=1") == 0
    before = snapshot(out)
    newer = tmp_path / "newer.yaml"
    newer.write_text(Path(TOY).read_text() + "schema: 99\n")
    assert cli("train", str(newer), "--out", str(out), "--resume", *ARGS) == 2
    assert "schema 99, newer than this ace supports" in capsys.readouterr().err
    assert cli("train", TOY, "--out", str(out), *ARGS, "train.epochs=1") == 1  # no --resume: refused
    assert snapshot(out) == before


def test_metrics_with_a_torn_tail_and_a_corrupt_middle(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_metrics(path) == [{"step": 1}, {"step": 2}]
    log = MetricsLog(path)  # reopening cuts the torn tail before appending
    log.write({"step": 3})
    log.close()
    assert read_metrics(path) == [{"step": 1}, {"step": 2}, {"step": 3}]
    # damaged from outside: every line that is not a JSON record is skipped by number, the rest still reads
    path.write_bytes(b'{"step": 1}\n{"st\n[1, 2]\n\xff\xfe\n7\n{"step": 3}\n{"step": 4}')
    with pytest.warns(UserWarning) as caught:
        assert read_metrics(path) == [{"step": 1}, {"step": 3}, {"step": 4}]
    assert [str(w.message).split(": ", 1)[1] for w in caught] == [
        f"skipping line {n}: not a JSON record" for n in (2, 3, 4, 5)
    ]
    log = MetricsLog(path)  # resume: rewriting keeps every valid record (the unterminated last one is cut)
    with pytest.warns(UserWarning) as caught:
        log.truncate(lambda r: True)
    assert len(caught) == 4 and "skipping line 2" in str(caught[0].message)
    log.write({"step": 4})
    log.close()
    assert read_metrics(path) == [{"step": 1}, {"step": 3}, {"step": 4}]


def test_report_and_resume_read_past_a_damaged_line(tmp_path, reference, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    lines = (out / "metrics.jsonl").read_text().split("\n")
    lines[4] = lines[4][:15]  # a line damaged in the middle of the file
    (out / "metrics.jsonl").write_text("\n".join(lines))
    with pytest.warns(UserWarning, match="metrics.jsonl: skipping line 5: not a JSON record"):
        assert cli("report", str(out)) == 0
    with pytest.warns(UserWarning, match="skipping line 5"):
        assert resume(out) == 0
    kept = records(out)
    assert kept == [r for i, r in enumerate(records(reference)) if i != 4]  # only the damaged record is gone


def test_a_failed_metrics_rewrite_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in range(1, 5):
        log.write({"step": step})

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        log.truncate(lambda r: r["step"] <= 2)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]


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


def test_a_run_directory_in_use_by_another_process_is_refused(tmp_path, capsys):
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as held:  # as a second `ace train` holds it for its whole run
        fcntl.flock(held, fcntl.LOCK_EX)
        for extra in ([], ["--resume"], ["--overwrite"]):
            assert cli("train", TOY, "--out", str(out), *ARGS, *extra) == 1
            assert "is in use by another ace process" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == [".lock"]


def test_a_damaged_saved_config_stops_resume_and_export_with_one_line(
    tmp_path, reference, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for damage in (b"train: [1,\n", b"\xff\xfe", b"- a list\n"):
        (out / "config.yaml").write_bytes(damage)
        before = snapshot(out)
        for command in (["train", TOY, "--out", str(out), "--resume", *ARGS], ["export", str(out), "m.pt"]):
            assert cli(*command) == 1
            err = capsys.readouterr().err
            assert err.startswith("ace: error: ") and "config.yaml" in err and err.count("\n") == 1
        assert snapshot(out) == before
    assert config_changes(reference, load_config(TOY, [*ARGS, "train.epochs=5", "seed=1"])) == [
        "seed: 0 -> 1"
    ]


def test_resume_of_a_run_dir_with_a_changed_config_is_refused_untouched(tmp_path):
    out = tmp_path / "run"
    assert cli("train", TOY, "--out", str(out), *ARGS, "train.epochs=1") == 0
    before = snapshot(out)
    with pytest.raises(RunDirError, match="model.hidden: 16 -> 32"):
        run(load_config(TOY, [*ARGS, "model.hidden=32"]), out, resume=True)
    assert snapshot(out) == before
