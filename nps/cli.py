"""The `nps` command.

    nps reproduce synthetic   [--out DIR] [--set field=value ...] [--fresh] [--quiet]
    nps reproduce correlation [--out DIR] [--set field=value ...] [--fresh] [--quiet]
    nps reproduce synthetic --print-config     # the typed defaults, as JSON

A re-run with the same --out resumes each model from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Callable

from nps.errors import NPSError


def _experiments() -> dict[str, tuple[type, Callable]]:
    # Imported lazily so that `nps --help` answers without loading JAX.
    from nps.experiments.correlation import CorrelationConfig, run_correlation
    from nps.experiments.synthetic import SyntheticConfig, run_synthetic

    return {"synthetic": (SyntheticConfig, run_synthetic), "correlation": (CorrelationConfig, run_correlation)}


EXPERIMENTS = ("synthetic", "correlation")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nps", description="Few-shot steerable alignment with neural processes.")
    commands = parser.add_subparsers(dest="command", required=True)
    reproduce = commands.add_parser("reproduce", help="run one of the paper's experiments")
    reproduce.add_argument("experiment", choices=EXPERIMENTS)
    reproduce.add_argument("--out", default=None, help="output folder (default: runs/<experiment>)")
    reproduce.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a config field, e.g. --set train.steps=200 --set eval.context_sizes=0,1,10",
    )
    reproduce.add_argument("--fresh", action="store_true", help="discard checkpoints in --out and start over")
    reproduce.add_argument("--quiet", action="store_true", help="no progress bars")
    reproduce.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"nps: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = _one_line_warning
    try:
        from nps.config import apply_overrides, config_to_dict

        config_cls, run = _experiments()[args.experiment]
        config = apply_overrides(config_cls(), args.overrides)
        config.validate()
        if args.print_config:
            print(json.dumps(config_to_dict(config), indent=2))
            return 0
        run(config, args.out or f"runs/{args.experiment}", fresh=args.fresh, progress=not args.quiet)
    except NPSError as error:
        print(f"nps: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
