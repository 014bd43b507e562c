"""Damaged and hostile files: checkpoints, data caches, metrics, saved configs, a run directory in use."""

import os
import shutil
from pathlib import Path

import pytest
import torch
from fault_kit import (
    ARGS,
    TOY,
    assert_same_run,
    checkpoint,
    cli,
    make_trainer,
    records,
    resume,
)

from ace.config import load_config
from ace.config.run_config import config_changes
from ace.experiment import run
from ace.runs import CheckpointError, MetricsLog, RunDirError, read_metrics
from ace.train import Trainer

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
