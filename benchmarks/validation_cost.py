"""What one validation pass of a relaxed model costs, and which part of it is the read-out.

    python benchmarks/validation_cost.py                 # N-body's relaxed EGNN (configs/nbody.yaml)
    python benchmarks/validation_cost.py --config configs/shapes.yaml --rounds 3

CPU time of ``Trainer.validation.evaluate`` on the config's validation set, one torch thread, the variants
taking turns in each of ``--rounds`` rounds (median over rounds; the machine's speed drifts between them):

* **model and f_eq**: loss, metrics and deviation of the relaxed model and f_eq (``readout=False``);
* **+ per-layer deviations**: and each gated layer's measured deviation and the model on transformed data
  (``val/heldout/transformed``, one pass a batch), without the branches' held-out benefits
  (``val/heldout/<layer>``, left out by filtering the evaluation's variants);
* **+ held-out benefits (default)**: what every validation at the read-out's cadence computes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ace.train.evaluation as evaluation  # noqa: E402
from ace.config import load_config  # noqa: E402
from ace.experiment import prepare_run  # noqa: E402
from ace.runs.metrics import format_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "nbody.yaml"))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    trainer, loaders = prepare_run(load_config(args.config, ["method=ace", "log.progress=false"]), None)
    variants = evaluation._variants

    def without_benefits(*a, **k):
        return (v for v in variants(*a, **k) if v[0] != "heldout/")

    passes = {
        "model and f_eq": (variants, False),
        "+ per-layer deviations": (without_benefits, True),
        "+ held-out benefits (default)": (variants, True),
    }
    times: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(args.rounds):
        for name, (chosen, readout) in passes.items():
            evaluation._variants = chosen
            started = time.process_time()
            trainer.validation.evaluate(loaders["val"], readout=readout)
            times[name].append(time.process_time() - started)
    evaluation._variants = variants
    base = statistics.median(times["model and f_eq"])
    rows = [
        [name, f"{statistics.median(t):.3f}", f"{statistics.median(t) / base:.2f}"]
        for name, t in times.items()
    ]
    print(f"{args.config}: one validation pass, CPU s (median of {args.rounds} rounds)\n")
    print(format_table(["validation pass", "CPU s", "/ model and f_eq"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
