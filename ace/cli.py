"""Command line: ``ace train | config | report | compare | sweep | tune | export | probe``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from ace.config.loading import dump_config, load_config, run_name
from ace.config.reference import reference
from ace.config.schema import ConfigError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ace", description="Train models under equivariance constraints.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a config into a run directory")
    train.add_argument("config", help="YAML config file (see configs/)")
    train.add_argument("overrides", nargs="*", help="dotted overrides such as train.epochs=2 optim.lr=1e-3")
    train.add_argument("--out", default=None, help="run directory (default: runs/<config name>_<method>)")
    train.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    train.add_argument("--overwrite", action="store_true", help="replace a run already in --out")

    config = sub.add_parser("config", help="print the resolved config (or the reference of every key)")
    config.add_argument("config", nargs="?", help="YAML config file")
    config.add_argument("overrides", nargs="*", help="dotted overrides")
    config.add_argument(
        "--reference", action="store_true", help="print every key with its default and meaning"
    )

    report = sub.add_parser("report", help="balance tables and plots of a run (writes RUN_DIR/report.md)")
    report.add_argument("run_dir", help="a run directory written by `ace train`")

    compare = sub.add_parser("compare", help="side-by-side table of several runs")
    compare.add_argument("run_dirs", nargs="+", help="run directories")
    compare.add_argument("--out", default=None, help="also write compare.md, compare.csv and plots here")

    sweep = sub.add_parser("sweep", help="train a grid of overrides one after another, then compare")
    sweep.add_argument("config", help="YAML config file")
    sweep.add_argument("overrides", nargs="*", help="grid axes such as dual.lr=0.1,1.0 optim.lr=1.0e-3")
    sweep.add_argument("--out", required=True, help="sweep directory (one run directory per combination)")

    tune = sub.add_parser("tune", help="search a config's settings with Optuna (extra `tune`)")
    tune.add_argument("config", help="YAML config file")
    tune.add_argument("overrides", nargs="*", help="dotted overrides applied to every trial")
    tune.add_argument("--space", required=True, help="search space YAML (config keys -> ranges)")
    tune.add_argument(
        "--trials", type=int, required=True, help="finished trials wanted (counted over reruns)"
    )
    tune.add_argument("--jobs", type=int, default=1, help="local worker processes (default 1)")
    tune.add_argument("--out", default=None, help="study folder (default: runs/tune_<config name>)")
    tune.add_argument("--storage", default=None, help="database URL (default: OUT/study.journal)")
    tune.add_argument(
        "--study", default=None, help="study name in the storage (default: the --out folder name)"
    )
    tune.add_argument(
        "--variant", choices=("model", "eq"), default="model", help="score the relaxed model or f_eq"
    )
    tune.add_argument("--metric", default=None, help="validation metric (default: the one runs select on)")
    tune.add_argument(
        "--max-deviation", type=float, default=None, help="constraint: validation relative deviation <= this"
    )
    tune.add_argument("--pareto", action="store_true", help="two objectives: the metric and the deviation")
    tune.add_argument("--pruner", choices=("median", "hyperband", "none"), default="median")
    tune.add_argument("--seed", type=int, default=0, help="the sampler's seed (worker i uses seed + i)")
    tune.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    tune.add_argument(
        "--retrain",
        action="store_true",
        help="then train the config as written and the --top best over --seeds",
    )
    tune.add_argument("--top", type=int, default=1, help="best trials to retrain (default 1)")
    tune.add_argument("--seeds", type=int, default=3, help="seeds of each retrained config (default 3)")

    export = sub.add_parser("export", help="save a run's trained model and measure its equivariance error")
    export.add_argument("run_dir", help="a run directory written by `ace train`")
    export.add_argument("out", help="output file, e.g. model.pt (its state_dict goes to model.state_dict.pt)")
    export.add_argument(
        "--equivariant", action="store_true", help="export the exactly equivariant f_eq (gates stripped)"
    )

    probe = sub.add_parser("probe", help="data symmetry, per-layer audit and intrinsic dimensions of a run")
    probe.add_argument("run_dir", help="a run directory written by `ace train`")
    probe.add_argument("--samples", type=int, default=8, help="group elements per input (default 8)")
    return parser


def _train(args: argparse.Namespace) -> None:
    from pathlib import Path

    from ace.experiment import run
    from ace.train.heldout import COMPARED_WITH

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / run_name(args.config, cfg.method)
    summary = run(cfg, out, resume=args.resume, overwrite=args.overwrite)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    for split in ("val", "test"):
        scores = {
            k.removeprefix(split + "/"): v for k, v in summary[split].items() if k not in ("step", "epoch")
        }
        if scores:
            print(f"{split}: " + "  ".join(f"{k}={v:.4g}" for k, v in scores.items()))
    held = summary.get("heldout")
    if held:
        gap = (
            f"validation {held['metric']} on transformed data less on the data"
            if held["compared_with"] == COMPARED_WITH
            else f"validation {held['metric']} of f_eq less the relaxed model's"
        )
        print(
            f"held-out read-out: {held['verdict']} ({gap}: {held['benefit']:.3g}, 95 % interval "
            f"{held['low']:.3g} .. {held['high']:.3g}"
            + (f"; on the test split: {held['test']['verdict']}" if "test" in held else "")
            + f"; ace report {out})"
        )
    print(f"run directory: {out}")


def _tune(args: argparse.Namespace) -> None:
    from pathlib import Path

    from ace.tune.report import format_report
    from ace.tune.search import TuneSettings, tune

    out = args.out or str(Path("runs") / f"tune_{Path(args.config).stem}")
    settings = TuneSettings(
        config=args.config,
        space=args.space,
        trials=args.trials,
        out=out,
        overrides=tuple(args.overrides),
        storage=args.storage,
        study=args.study,
        variant=args.variant,
        metric=args.metric,
        max_deviation=args.max_deviation,
        pareto=args.pareto,
        pruner=args.pruner,
        seed=args.seed,
        threads=args.threads,
    )
    print(
        format_report(
            tune(settings, jobs=args.jobs, retrain=(args.top, args.seeds) if args.retrain else None)
        )
    )
    print(f"study folder: {out}")


def _export(args: argparse.Namespace) -> None:
    from pathlib import Path

    from ace.export import export
    from ace.runs.layout import OutputError, check_writable

    if Path(args.out).is_dir():
        raise OutputError(f"cannot write the model to {args.out}: it is a directory")
    check_writable(Path(args.out).parent, "folder of the exported model")

    errors = export(args.run_dir, args.out, equivariant=args.equivariant)
    kind = "equivariant f_eq" if args.equivariant else "relaxed model"
    print(f"saved the {kind} to {args.out} (whole module) and its state_dict next to it")
    print(
        "equivariance error (float64, validation batches): "
        f"max |f(g.x) - rho(g) f(x)| = {errors['max_abs_error']:.3e}, "
        f"D = {errors['deviation']:.3e}, D_rel = {errors['relative_deviation']:.3e}"
    )


def _config(args: argparse.Namespace) -> None:
    if args.reference:
        print(reference())
    elif args.config is None:
        raise ConfigError("ace config needs a CONFIG file (or --reference)")
    else:
        print(dump_config(load_config(args.config, args.overrides)), end="")


def _report(args: argparse.Namespace) -> None:
    from ace.report import report

    print(report(args.run_dir))


def _compare(args: argparse.Namespace) -> None:
    from ace.runs.compare import compare

    print(compare(args.run_dirs, out=args.out))


def _sweep(args: argparse.Namespace) -> None:
    from ace.sweep import sweep

    print(sweep(args.config, args.overrides, args.out))


def _probe(args: argparse.Namespace) -> None:
    from ace.probe import probe

    print(probe(args.run_dir, samples=args.samples))


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "train": _train,
    "config": _config,
    "report": _report,
    "compare": _compare,
    "sweep": _sweep,
    "tune": _tune,
    "export": _export,
    "probe": _probe,
}


def _exit_code(err: Exception) -> int | None:
    """The exit status of an error the CLI reports in one line (2: a usage error found before any work, 1: the
    run or its files), or None for a bug, which keeps its traceback."""
    from ace.export import ExportError
    from ace.runs.checkpoint import CheckpointError
    from ace.runs.layout import OutputError, RunDirError
    from ace.train.faults import NonFiniteError

    codes: list[tuple[type[Exception] | tuple[type[Exception], ...], int]] = [
        (OutputError, 2),  # a bad --out (a subclass of RunDirError: first)
        ((RunDirError, CheckpointError, NonFiniteError, ExportError, OSError), 1),
    ]
    return next((code for kind, code in codes if isinstance(err, kind)), None)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)  # overrides may come after --out
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra and not hasattr(args, "overrides"):
        parser.error(f"ace {args.command} takes no overrides: {' '.join(extra)}")
    args.overrides = [*getattr(args, "overrides", []), *extra]
    try:
        COMMANDS[args.command](args)
    except ConfigError as err:
        print(f"ace: config error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Interrupted carries where the checkpoint went
        print(f"ace: interrupted: {err}" if str(err) else "ace: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, ValueError, OSError) as err:
        code = _exit_code(err)
        if code is None:
            raise
        if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
            # an unwritable output path, a full disk: one line, not a traceback
            where = f"{err.filename}: " if err.filename is not None else ""
            print(f"ace: error: {where}{err.strerror or err}", file=sys.stderr)
        else:
            print(f"ace: error: {err}", file=sys.stderr)
        return code
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
