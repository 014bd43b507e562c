"""The held-out read-out against the training-priced verdict, over the seeds of finished runs.

    python benchmarks/heldout.py "toy, symmetric=runs/v02/toy/toy_relaxed_ace_resilient" \\
        "toy, breaking 0.5=runs/v02/toy_break/toy_relaxed_ace_resilient" --out docs/heldout.md

Each ``LABEL=FOLDER`` names the seeds of one run (``FOLDER/seed*``, ``benchmarks/compare.py``'s layout).
For every seed: the whole model's held-out verdict against transformed data (:mod:`ace.train.heldout`; from
``summary.json``, or computed from the run's best relaxed checkpoint for runs made before it scored the loss
per sample against transformed data, or with ``--recompute``), the same model's verdict on the test split
("on test"), its benefit and interval, and the training-priced verdict the report gives (``breaks`` when a
gated layer's measured relative deviation on the final validation pass exceeds ``ace.report.SYMMETRIC``
(1e-5), as in ``ace report``), with the largest slack; then the verdicts of each run counted over its seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ace.report import SYMMETRIC, of_run  # noqa: E402
from ace.runs.metrics import format_table  # noqa: E402
from ace.train.heldout import HeldOut  # noqa: E402


def seed_row(run: Path, recompute: bool) -> list:
    summary = json.loads((run / "summary.json").read_text())
    read_out = of_run(run, summary, recompute)
    verdict = HeldOut(*(read_out[k] for k in ("benefit", "low", "high", "relaxed", "without"))).verdict
    layers = summary.get("layers") or {}
    measured = [row.get("relative_deviation") for row in layers.values()]
    measured = [m for m in measured if m is not None]
    priced = "breaks" if any(m > SYMMETRIC for m in measured) else "symmetric"
    slacks = [row["slack"] for row in layers.values() if row.get("slack") is not None]
    test = read_out.get("test", {}).get("verdict", "-")  # the whole model on the test split
    return [
        run.name,
        verdict,
        test,
        f"{read_out['benefit']:.3g} [{read_out['low']:.3g}, {read_out['high']:.3g}]",
        f"{read_out['relaxed']:.4g} / {read_out['without']:.4g}",
        priced,
        f"{max(measured):.2g}" if measured else "-",
        f"{max(slacks):.2g}" if slacks else "-",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("groups", nargs="+", help="LABEL=FOLDER (the folder holds seed0, seed1, ...)")
    parser.add_argument("--out", default=None, help="also write the table (markdown) here")
    parser.add_argument(
        "--recompute", action="store_true", help="compute every read-out from the checkpoints"
    )
    args = parser.parse_args(argv)
    header = ["runs", "seed", "held-out verdict", "on test", "benefit [95 %]", "val loss relaxed / without"]
    header += ["priced", "max layer rel. dev.", "max slack"]
    rows = []
    for group in args.groups:
        label, sep, folder = group.partition("=")
        if not sep:
            parser.error(f"{group!r} is not LABEL=FOLDER")
        seeds = sorted(p for p in Path(folder).glob("seed*") if (p / "summary.json").exists())
        if not seeds:
            parser.error(f"no finished run under {folder}")
        rows += [[label, *seed_row(run, args.recompute)] for run in seeds]
    counts: dict[str, Counter] = {}  # label -> verdict -> seeds
    for row in rows:
        counts.setdefault(row[0], Counter())[row[2]] += 1
    tally = [[label, ", ".join(f"{v} x{n}" for v, n in sorted(c.items()))] for label, c in counts.items()]
    table = format_table(header, rows) + "\n\n" + format_table(["runs", "held-out verdicts"], tally)
    command = "python benchmarks/heldout.py " + " ".join(f'"{g}"' for g in args.groups)
    if args.out:
        Path(args.out).write_text(f"`{command}`\n\n{table}\n", encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
