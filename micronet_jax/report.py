"""`python -m micronet_jax.report --workdir=DIR`: every plot of a finished (or partly
finished) run, each PNG with its CSV (the work is in `micronet_jax.recipe.run_plots`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from micronet_jax.errors import CommandParser, MicronetError, print_error


def parser() -> CommandParser:
    cli = CommandParser(
        prog="python -m micronet_jax.report",
        description="Plots of a run: per-layer cost, accuracy vs sparsity, exit trade-off, "
        "training curves (PNG + CSV each).",
    )
    cli.add_argument("--workdir", required=True, help="a pipeline (or training) workdir")
    cli.add_argument("--out", default=None, help="where the plots go (default: WORKDIR/plots)")
    return cli


def main(argv: Sequence[str] | None = None) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    if not Path(args.workdir).is_dir():
        cli.error(f"--workdir {args.workdir} is not a directory")
    from micronet_jax.recipe.run_plots import write_plots

    try:
        paths = write_plots(Path(args.workdir), args.out and Path(args.out))
    except MicronetError as error:
        return print_error(error)
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
