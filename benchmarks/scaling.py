"""Test error against training-set size, and the fitted exponent alpha of error ~ C n^-alpha.

    python benchmarks/scaling.py nbody_strict nbody_ace --runs 500=runs/samples_n500 \\
        1000=runs/samples_n1000 2000=runs/samples_n2000 3000=runs/nbody3000 --metric mse

Each ``N=DIR`` names the runs trained on ``data.train_size = N`` (``DIR/<config>/seed*/summary.json``, as
written by ``benchmarks/compare.py``). Every cell is the test metric at its best validation step of f_eq
(``--variant eq``, the default) or of the relaxed model itself (``--variant model``: the one an unconstrained
relaxation deploys; for a strict model both are the same), mean +- std over the seeds found (their number in
brackets); alpha is fitted over every run (seeds as repeated sizes) by :func:`ace.diagnostics.power_law`, with
its 95 % interval. ``--plot FILE`` draws the runs and the fits on log-log axes. ``--one-minus`` tabulates and
fits ``1 - metric``: the error rate of an accuracy (``--metric accuracy --one-minus``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ace.runs.metrics import format_table  # noqa: E402
from ace.runs.plots import plot_scaling  # noqa: E402
from ace.runs.reader import best_val_test  # noqa: E402
from ace.symmetry.diagnostics import power_law  # noqa: E402


def values(root: Path, config: str, metric: str, variant: str = "eq", one_minus: bool = False) -> list[float]:
    out = []
    for summary in sorted((root / config).glob("seed*/summary.json")):
        value = best_val_test(json.loads(summary.read_text()))[variant][metric]
        out.append(1.0 - value if one_minus else value)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="config names (the folders under each DIR)")
    parser.add_argument("--runs", nargs="+", required=True, help="N=DIR pairs")
    parser.add_argument("--metric", default="mse")
    parser.add_argument("--variant", choices=["eq", "model"], default="eq", help="f_eq or the relaxed model")
    parser.add_argument("--one-minus", action="store_true", help="fit 1 - metric (an accuracy's error rate)")
    parser.add_argument("--plot", type=Path, help="write a log-log plot of the runs and fits here (PNG)")
    args = parser.parse_args(argv)
    sizes = {int(n): Path(d) for n, d in (item.split("=", 1) for item in args.runs)}
    rows, curves = [], {}
    for config in args.configs:
        row, xs, ys = [f"`{config}`"], [], []
        for n, root in sorted(sizes.items()):
            found = values(root, config, args.metric, args.variant, args.one_minus)
            xs += [n] * len(found)
            ys += found
            if not found:
                row.append("-")
            elif len(found) == 1:
                row.append(f"{found[0]:.4g} (1)")
            else:
                row.append(f"{statistics.mean(found):.4g} ± {statistics.stdev(found):.2g} ({len(found)})")
        try:
            fit = power_law(xs, ys)
            row.append(f"{fit.alpha:.2f} [{fit.low:.2f}, {fit.high:.2f}]")
        except ValueError:
            fit = None
            row.append("-")
        rows.append(row)
        curves[config] = (xs, ys, fit)
    header = ["config", *[f"n = {n}" for n in sorted(sizes)], "alpha [95 % interval]"]
    print(format_table(header, rows))
    if args.plot is not None:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        metric = f"1 - {args.metric}" if args.one_minus else args.metric
        print(f"plot: {plot_scaling(curves, args.plot, f'test {metric} ({args.variant})')}")


if __name__ == "__main__":
    main()
