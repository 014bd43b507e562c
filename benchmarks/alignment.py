"""Does the best model symmetry follow the data's? (Petrache & Trivedi; issue 14's alignment experiment.)

    python benchmarks/alignment.py --free runs/alignment/free --strict runs/alignment/strict \
        --eps runs/alignment/eps_a runs/alignment/eps_b --out runs/alignment

Reads ``ace sweep`` directories over the same ladder of data sets (e.g. ``data.field_strength``; a sweep
may be split over several directories): ``--free`` holds an ``unconstrained`` and an ``ace_resilient`` run
per data set, ``--eps`` the ``scheduled`` runs under a deviation constraint whose final tolerance
``constraint.tolerance.end`` sweeps several decades, and optionally ``--strict`` the exactly equivariant model
(the tolerance 0 of the sweep). For each data set it prints the data's asymmetry (the
symmetrisation gap of the unconstrained model, :func:`ace.probe.data_symmetry`), the test metric of the
relaxed model at its best validation step for every tolerance, the best tolerance, and what resilient
training chose by itself (its measured deviation D and slack u); and it draws both with
:func:`ace.runs.plots.plot_tolerance_sweeps`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ace.config.run_config import load_run_config  # noqa: E402
from ace.probe import data_symmetry  # noqa: E402
from ace.runs.metrics import format_table  # noqa: E402
from ace.runs.plots import ToleranceSweep, plot_tolerance_sweeps  # noqa: E402
from ace.runs.reader import best_val_test  # noqa: E402


def finished(roots: list[Path]):
    """``(config, summary, run directory)`` of every finished run under ``roots``."""
    for root in roots:
        for summary in sorted(root.glob("*/summary.json")):
            yield load_run_config(summary.parent), json.loads(summary.read_text()), summary.parent


def level_of(cfg, key: str) -> float:
    section, _, name = key.partition(".")
    return float(getattr(getattr(cfg, section), name))


def main(argv: list[str] | None = None) -> list[ToleranceSweep]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--free", type=Path, nargs="+", required=True, help="sweep(s) of unconstrained, ace_resilient"
    )
    parser.add_argument(
        "--eps", type=Path, nargs="+", required=True, help="sweep(s) of scheduled over tolerance.end"
    )
    parser.add_argument("--strict", type=Path, nargs="*", default=[], help="sweep(s) of the strict model")
    parser.add_argument("--level", default="data.field_strength", help="the config key of the data ladder")
    parser.add_argument("--metric", default="mse")
    parser.add_argument("--samples", type=int, default=8, help="group elements of the symmetrisation gap")
    parser.add_argument("--out", type=Path, help="folder of the plots (default: no plots)")
    args = parser.parse_args(argv)

    free: dict[float, dict] = defaultdict(dict)
    for cfg, summary, run in finished(args.free + args.strict):
        free[level_of(cfg, args.level)][cfg.method] = (summary, run)
    swept: dict[float, list[tuple[float, float]]] = defaultdict(list)
    for cfg, summary, _ in finished(args.eps):
        eps = float(cfg.constraint.tolerance["end"])
        swept[level_of(cfg, args.level)].append((eps, best_val_test(summary)["model"][args.metric]))

    sweeps, rows = [], []
    tolerances = sorted({eps for points in swept.values() for eps, _ in points})
    for level in sorted(set(free) | set(swept)):
        runs = free[level]
        if "unconstrained" not in runs:
            print(f"{args.level}={level}: no finished unconstrained run, skipped", file=sys.stderr)
            continue
        gap = data_symmetry(runs["unconstrained"][1], args.samples)
        points = dict(sorted(swept[level]))
        sweep = ToleranceSweep(
            label=f"{args.level.split('.')[-1]} {level:g}",
            asymmetry=gap.gap,
            tolerances=list(points),
            metrics=list(points.values()),
            free=best_val_test(runs["unconstrained"][0])["model"][args.metric],
            strict=best_val_test(runs["strict"][0])["model"][args.metric] if "strict" in runs else None,
        )
        if "ace_resilient" in runs:
            summary = runs["ace_resilient"][0]
            sweep.chosen_deviation = summary["val"]["val/deviation"]
            sweep.chosen_slack = summary["constraints"]["deviation"]["slack"]
            sweep.chosen_metric = best_val_test(summary)["model"][args.metric]
        sweeps.append(sweep)
        chosen = sweep.chosen_metric is not None
        rows.append(
            [
                f"{level:g}",
                f"{gap.gap:.2g} [{gap.low:.2g}, {gap.high:.2g}]",
                f"{gap.relative_deviation:.2g}",
                f"{sweep.strict:.4g}" if sweep.strict is not None else "-",
                *(f"{points[e]:.4g}" if e in points else "-" for e in tolerances),
                f"{sweep.best_tolerance:g}" if points else "-",
                f"{sweep.free:.4g}",
                f"{sweep.chosen_metric:.4g}" if chosen else "-",
                f"{sweep.chosen_deviation:.2g} / {sweep.chosen_slack:.2g}" if chosen else "-",
            ]
        )
    header = [
        args.level,
        "asymmetry: gap [95 %]",
        "rel. dev. (unconstrained)",
        "strict (eps 0)",
        *(f"eps {e:g}" for e in tolerances),
        "best eps",
        "unconstrained",
        "resilient",
        "resilient D / u",
    ]
    print(f"test {args.metric} of the relaxed model at its best validation step")
    print(format_table(header, rows))
    if args.out is not None and sweeps:
        args.out.mkdir(parents=True, exist_ok=True)
        for path in plot_tolerance_sweeps(sweeps, args.out, f"test {args.metric}"):
            print(f"wrote {path}")
    return sweeps


if __name__ == "__main__":
    main()
