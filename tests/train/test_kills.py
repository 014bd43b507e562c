"""Kills and a full disk: every kill runs the real CLI in a subprocess (a patched hook SIGKILLs it at an exact
point, so each case is deterministic); after ``--resume`` the final state equals an uninterrupted run bit for
bit (CPU, one thread)."""

import errno
import os
import shutil
import signal
import time

import pytest
import torch
from fault_kit import (
    ARGS,
    OLD_DUAL,
    TOY,
    ConstantField,
    assert_same_run,
    checkpoint,
    cli,
    loader,
    make_trainer,
    records,
    resume,
    runner,
)

from ace.runs import CheckpointError, MetricsLog, read_metrics

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
