"""ACE at a long budget: paired differences by seed, the gates' trajectory and the validation curves.

    python benchmarks/compare.py nbody:strict,ace nbody_paper:ace --seeds 3 --jobs 2 --out runs/nbody30k \\
        train.epochs=1000 train.eval_every=25 train.checkpoint_every=25
    python benchmarks/long_budget.py runs/nbody30k nbody_strict nbody_ace nbody_paper_ace \\
        --plot docs/long_budget/nbody30k.png

Reads ``RUNS/<config>/seed<s>`` (``benchmarks/compare.py``'s layout) and prints, per config, test mse of
f_eq at its best validation step (mean ± std over the seeds found), its difference to the first config seed
by seed, the step at which the largest ``|gamma|`` first falls below 0.1 and 0.01 (and the last step it was
above 0.01), and the first validation step at which f_eq's validation mse reaches the first config's best:
the convergence claim of the ACE paper ("f_eq reaches a lower validation mse sooner than strict"). ``--plot``
draws the validation curves of f_eq (mean over seeds, the band one std) and the largest gate.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def read(run: Path) -> dict[str, Any]:
    """One run: its summary (None while unfinished), validation curve of f_eq and largest-gate trajectory."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = [(r["step"], r.get("val/eq/mse", r.get("val/mse"))) for r in records if "val/mse" in r]
    gates = [
        (r["step"], max(abs(v) for k, v in r.items() if k.startswith("gate/") and k.count("/") == 1))
        for r in records
        if "loss" in r and any(k.startswith("gate/") for k in r)
    ]
    done = run / "summary.json"
    return {"summary": json.loads(done.read_text()) if done.exists() else None, "val": val, "gates": gates}


def crossing(gates: list[tuple[int, float]], level: float) -> tuple[int | None, int | None]:
    """(first step below ``level``, last step above it) of the largest gate."""
    first = next((s for s, g in gates if g < level), None)
    last = max((s for s, g in gates if g >= level), default=None)
    return first, last


def fmt(values: list[float], digits: int = 4) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}g}"
    return f"{statistics.mean(values):.{digits}g} ± {statistics.stdev(values):.2g}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", type=Path, help="compare.py's output folder")
    parser.add_argument("configs", nargs="+", help="config names (the first is the reference, e.g. strict)")
    parser.add_argument("--plot", type=Path, help="write the validation curves here (PNG)")
    args = parser.parse_args()
    data = {
        name: {int(p.name[4:]): read(p) for p in sorted((args.runs / name).glob("seed*"))}
        for name in args.configs
    }
    reference = data[args.configs[0]]
    best_ref = {
        seed: min(v for _, v in run["val"])
        for seed, run in reference.items()
        if run["val"] and run["summary"]
    }
    print(
        "| config | seeds | test mse (f_eq, best val) | minus the first config, by seed "
        "| max abs(gamma) < 0.1 | < 0.01 | last >= 0.01 | steps to the first config's best val (by seed) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, runs in data.items():
        finished = {s: r for s, r in runs.items() if r["summary"]}
        tests = {s: r["summary"]["selected"]["eq"]["test"]["mse"] for s, r in finished.items()}
        diffs = [
            tests[s] - reference[s]["summary"]["selected"]["eq"]["test"]["mse"]
            for s in tests
            if s in reference and reference[s]["summary"]
        ]
        cross = [[crossing(r["gates"], level) for r in finished.values()] for level in (0.1, 0.01)]
        reach = []
        for s, r in finished.items():
            if s in best_ref:
                reach.append(next((step for step, v in r["val"] if v <= best_ref[s]), None))
        steps = lambda xs: ", ".join("-" if x is None else str(x) for x in xs) or "-"  # noqa: E731
        print(
            f"| `{name}` | {len(finished)} | {fmt(list(tests.values()))} | "
            f"{', '.join(f'{d:+.2g}' for d in diffs) or '-'} | {steps(c[0] for c in cross[0])} | "
            f"{steps(c[0] for c in cross[1])} | {steps(c[1] for c in cross[1])} | {steps(reach)} |"
        )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
        for name, runs in data.items():
            curves = [r["val"] for r in runs.values() if r["val"]]
            if curves:
                length = min(len(c) for c in curves)
                steps = [s for s, _ in curves[0][:length]]
                values = [[c[i][1] for c in curves] for i in range(length)]
                mean = [statistics.mean(v) for v in values]
                spread = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
                top.plot(steps, mean, label=f"{name} ({len(curves)} seeds)")
                top.fill_between(
                    steps,
                    [m - s for m, s in zip(mean, spread)],
                    [m + s for m, s in zip(mean, spread)],
                    alpha=0.2,
                )
            for run in runs.values():
                if run["gates"]:
                    bottom.plot(
                        *zip(*run["gates"]), lw=0.6, label=name if run is next(iter(runs.values())) else None
                    )
        top.set_yscale("log")
        top.set_ylabel("validation mse of f_eq")
        top.legend()
        bottom.set_yscale("log")
        bottom.set_ylabel("largest abs(gate)")
        bottom.set_xlabel("step")
        bottom.legend()
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
