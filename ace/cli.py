"""Command line: ``ace train | config``."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, dump_config, load_config, reference

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ace", description="Train models under equivariance constraints.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a config into a run directory")
    train.add_argument("config", help="YAML config file (see configs/)")
    train.add_argument("overrides", nargs="*", help="dotted overrides such as train.epochs=2 optim.lr=1e-3")
    train.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
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
    return parser


def _train(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .experiment import run

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    summary = run(cfg, out, resume=args.resume, overwrite=args.overwrite)
    for split in ("val", "test"):
        scores = {
            k.removeprefix(split + "/"): v for k, v in summary[split].items() if k not in ("step", "epoch")
        }
        if scores:
            print(f"{split}: " + "  ".join(f"{k}={v:.4g}" for k, v in scores.items()))
    print(f"run directory: {out}")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)  # overrides may come after --out
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*getattr(args, "overrides", []), *extra]
    try:
        if args.command == "train":
            _train(args)
        elif args.command == "config":
            if args.reference:
                print(reference())
            elif args.config is None:
                raise ConfigError("ace config needs a CONFIG file (or --reference)")
            else:
                print(dump_config(load_config(args.config, args.overrides)), end="")
    except ConfigError as err:
        print(f"ace: config error: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, ValueError, OSError) as err:
        from .experiment import RunDirError
        from .trainer import CheckpointError

        if isinstance(err, (RunDirError, CheckpointError, FileNotFoundError)):
            print(f"ace: error: {err}", file=sys.stderr)
            return 1
        raise
    return 0
