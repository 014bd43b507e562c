"""What the fault tests share: a tiny toy CLI run and its subprocess runner, a tiny Trainer, NaN injection."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ace
from ace.cli import main
from ace.runs import read_metrics

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


def cli(*args):
    return main(list(args))


def resume(out, *extra):
    return cli("train", TOY, "--out", str(out), "--resume", *ARGS, *extra)


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


# --------------------------------------------------------------------------------------- multiplier ceiling


class ConstantField(nn.Module):
    """x -> A x + c with c fixed: D = E||c - g c||^2 > 0 whatever A is, so D <= 0 is infeasible."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2, bias=False)
        self.register_buffer("c", torch.tensor([1.0, 0.0]))

    def forward(self, x):
        return self.linear(x) + self.c
