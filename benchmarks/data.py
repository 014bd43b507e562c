"""Time to generate the N-body and shapes data sets at their default sizes, with the cache disabled.

    python benchmarks/data.py            # the default sizes: a few minutes on 2 CPU cores
    python benchmarks/data.py --quick    # 1/50 of the sizes (smoke test)

Each row times what a training run does when its cache is empty (``data.cache_dir: ""``): for the
N-body task the vectorised simulation of all three splits (``ace.tasks.nbody.load_data``, 5 particles,
4100 integration steps) and the conversion to torch_geometric graphs; for the shapes task the
procedural point clouds of all three splits (``ace.tasks.shapes.load_or_generate``). With the cache on,
later runs read the files instead (the last column: ``torch.load`` of the cached file). Times are CPU
seconds of this process (``time.process_time``) with one torch thread, one run each.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ace.runs.metrics import format_table  # noqa: E402
from ace.tasks import nbody, shapes  # noqa: E402


def timed(fn) -> tuple[float, Any]:
    t0 = time.process_time()  # CPU time: not inflated by other processes on shared cores
    result = fn()
    return time.process_time() - t0, result


def nbody_row(scale: float, cache: str) -> list[Any]:
    cfg = nbody.DataConfig()
    sizes = {k: max(1, round(getattr(cfg, k) * scale)) for k in ("train_size", "val_size", "test_size")}
    cfg = nbody.DataConfig(**sizes, cache_dir="")
    generate, tensors = timed(lambda: nbody.load_data(cfg))
    graphs, _ = timed(lambda: {s: nbody.to_graphs(t) for s, t in tensors.items()})
    cached = nbody.DataConfig(**sizes, cache_dir=cache)
    nbody.load_data(cached)  # writes the cache
    load, _ = timed(lambda: nbody.load_data(cached))
    systems = "/".join(str(v) for v in sizes.values())
    return ["nbody", f"{systems} systems x {cfg.num_particles} particles", generate, graphs, load]


def shapes_row(scale: float, cache: str) -> list[Any]:
    cfg = shapes.DataConfig()
    sizes = {k: max(1, round(getattr(cfg, k) * scale)) for k in ("train_size", "val_size", "test_size")}
    cfg = shapes.DataConfig(**sizes, cache_dir="")
    generate, splits = timed(lambda: shapes.load_or_generate(cfg))
    from torch_geometric.data import Data

    graphs, _ = timed(
        lambda: {k: [Data(pos=p.clone(), y=y.view(1).clone()) for p, y in zip(*v)] for k, v in splits.items()}
    )
    cached = shapes.DataConfig(**sizes, cache_dir=cache)
    shapes.load_or_generate(cached)
    load, _ = timed(lambda: shapes.load_or_generate(cached))
    clouds = "/".join(str(v) for v in sizes.values())
    return ["shapes", f"{clouds} clouds x {cfg.num_points} points", generate, graphs, load]


def main(argv: list[str] | None = None) -> list[list[Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1/50 of the default sizes")
    parser.add_argument("--tasks", nargs="+", default=["nbody", "shapes"], choices=["nbody", "shapes"])
    args = parser.parse_args(argv)
    scale = 0.02 if args.quick else 1.0
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, 1 thread, {os.cpu_count()} CPU cores shared with other work; "
        f"sizes x {scale:g} of the defaults (train/val/test); one run each",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for task in args.tasks:
            row = (nbody_row if task == "nbody" else shapes_row)(scale, cache)
            rows.append(row[:2] + [f"{t:.2f}" for t in row[2:]])
    header = ["task", "size (train/val/test)", "generate CPU s", "to graphs CPU s", "cached load CPU s"]
    print(format_table(header, rows))
    return rows


if __name__ == "__main__":
    main()
