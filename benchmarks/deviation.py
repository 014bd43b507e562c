"""Cost of ``ace.equivariance_deviation`` against one forward pass, for k = 1..8 group samples.

    python benchmarks/deviation.py            # about a minute on 2 CPU cores
    python benchmarks/deviation.py --quick    # smoke test, numbers not meaningful

Models: the EGNN of the N-body task (4 layers, a batch of 100 five-particle systems) and the toy MLP
(a batch of 64 planar points), each with its task's symmetry (E(3) and SO(2)). For each k:

* ``fwd ratio``: time of ``equivariance_deviation(model, x, sym, k, output=f(x))`` (what the trainer
  calls: ``f(x)`` is reused, the k transformed copies go through the model in one batched pass) over the
  time of ``f(x)``, both with autograd recording as in training. Ideal: about k.
* ``step ratio``: ``(loss + D).backward()`` including the forward passes, over ``loss.backward()``
  including its forward. Ideal: about 1 + k.
* ``saved MB`` / ``mem ratio``: the memory that the call adds to the training step's peak, i.e. the
  tensors autograd saves for the backward (counted with ``torch.autograd.graph.saved_tensors_hooks``,
  each storage once, parameters and the given ``f(x)`` left out), for ``f(x)`` alone and for the
  deviation. Temporaries freed inside the call (never more than one layer's worth) are not counted, nor
  is allocator caching: this is the activation memory, the part that grows with k, not the process's
  resident size.

Times are CPU times of this process (``time.process_time``, one torch thread, so other processes on
shared cores do not inflate them), medians over ``--reps`` alternating rounds after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ace import equivariance_deviation  # noqa: E402
from ace.config import load_config  # noqa: E402
from ace.experiment import build_task  # noqa: E402
from ace.runs.metrics import format_table  # noqa: E402
from ace.symmetry import call_model  # noqa: E402
from ace.utils import split_batch  # noqa: E402
from ace.utils.loaders import make_loader  # noqa: E402

#: (config, overrides, batch size)
MODELS = {
    "nbody-egnn": (
        "nbody.yaml",
        ["method=strict", "data.train_size=100", "data.val_size=1", "data.test_size=1"],
        100,
    ),
    "toy-mlp": ("toy.yaml", ["data.train_size=64"], 64),
}


def setup(name: str, batch: int, cache: str) -> tuple[torch.nn.Module, Any, torch.Tensor, Any, Callable]:
    config, overrides, _ = MODELS[name]
    extra = [f"data.cache_dir={cache}"] if name.startswith("nbody") else []
    cfg = load_config(ROOT / "configs" / config, overrides + extra)
    task = build_task(cfg)
    inputs, target = split_batch(next(iter(make_loader(task.train, batch, shuffle=False))))
    return task.model.train(), inputs, target, task.symmetry, task.loss


def seconds(fn: Callable[[], Any]) -> float:
    t0 = time.process_time()  # CPU time: not inflated by other processes on shared cores
    fn()
    return time.process_time() - t0


def saved_bytes(fn: Callable[[], Any], exclude: set[int]) -> tuple[int, Any]:
    """Bytes of the tensors that autograd saves for the backward during ``fn()`` (distinct storages, the
    ``exclude`` storages -- the parameters -- left out); and ``fn``'s result."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(seen.values()), result


def measure(name: str, ks: list[int], reps: int, warmup: int, batch: int, cache: str) -> list[list[Any]]:
    model, inputs, target, sym, loss_fn = setup(name, batch, cache)
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(0)

    def forward():
        return call_model(model, inputs)

    def deviation(k: int, output):
        return equivariance_deviation(model, inputs, sym, samples=k, generator=gen, output=output)

    def plain_step():
        model.zero_grad()
        loss_fn(forward(), target).backward()

    def deviation_step(k: int):
        model.zero_grad()
        output = forward()
        (loss_fn(output, target) + deviation(k, output)).backward()

    times: dict[str, list[float]] = {"fwd": [], "step": []} | {f"dev{k}": [] for k in ks}
    times |= {f"step{k}": [] for k in ks}
    for r in range(warmup + reps):
        with torch.no_grad():
            output = forward().detach()  # f(x) given to the deviation, as in the trainer
        row = {"fwd": seconds(forward), "step": seconds(plain_step)}
        for k in ks:
            row[f"dev{k}"] = seconds(lambda k=k, output=output: deviation(k, output))
            row[f"step{k}"] = seconds(lambda k=k: deviation_step(k))
        if r >= warmup:
            for key, value in row.items():
                times[key].append(value)
    med = {key: statistics.median(v) for key, v in times.items()}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    fwd_peak, output = saved_bytes(forward, params)
    rows = []
    for k in ks:
        dev_peak, _ = saved_bytes(
            lambda k=k: deviation(k, output), params | {output.untyped_storage().data_ptr()}
        )
        rows.append(
            [
                name,
                k,
                f"{1e3 * med['fwd']:.2f}",
                f"{1e3 * med[f'dev{k}']:.2f}",
                f"{med[f'dev{k}'] / med['fwd']:.2f}",
                f"{med[f'step{k}'] / med['step']:.2f}",
                f"{fwd_peak / 2**20:.2f}",
                f"{dev_peak / 2**20:.2f}",
                f"{dev_peak / max(fwd_peak, 1):.2f}",
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> list[list[Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run: checks the script, not the speed")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--samples", type=int, nargs="+", default=list(range(1, 9)), help="values of k")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.reps, args.warmup = [1, 2], 2, 1
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, 1 thread, {os.cpu_count()} CPU cores shared with other work; "
        f"CPU time, medians of {args.reps} rounds; memory = tensors saved for backward"
        + (" (--quick: NOT a measurement)" if args.quick else ""),
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for name in args.models:
            batch = 8 if args.quick else MODELS[name][2]
            rows += measure(name, args.samples, args.reps, args.warmup, batch, cache)
    header = [
        "model",
        "k",
        "forward ms",
        "deviation ms",
        "fwd ratio",
        "step ratio",
        "forward saved MB",
        "deviation saved MB",
        "mem ratio",
    ]
    print(format_table(header, rows))
    return rows


if __name__ == "__main__":
    main()
