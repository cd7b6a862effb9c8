"""Errors a user can cause (bad flags or config, missing or damaged data or checkpoints), and
how every command reports them.

Each is raised with one clear message naming the bad value and what is expected. Every
command (`main`, `export`, `score`, `report`) prints it as one line, `error: <message>`, on
stderr and exits with the error's `exit_status`: 2 for input the user can fix and rerun, 1
for a run that failed on its own (training diverged, a host of the job was lost). No
traceback for either.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

BAD_INPUT = 2  # exit status for a bad flag, config value, data set or checkpoint


class MicronetError(ValueError):
    """A problem with the user's input, explained in its message."""

    exit_status = BAD_INPUT


class DataError(MicronetError):
    """A data set is missing, damaged, or not what was asked for."""


class CheckpointError(MicronetError):
    """A checkpoint is missing, damaged, or does not fit the model."""


class ConfigError(MicronetError):
    """A configuration value is invalid."""


class LaunchError(MicronetError):
    """The processes of a multi-host job cannot start together (no coordinator, a missing
    peer, processes started with different configs)."""


def fail(message: str, status: int = BAD_INPUT) -> NoReturn:
    """Print `error: <message>` as one line on stderr and exit with `status`."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def print_error(error: MicronetError) -> int:
    """Print `error` as one line on stderr; its exit status."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    return error.exit_status


class CommandParser(argparse.ArgumentParser):
    """argparse as every command uses it: `--help` shows each flag's default (where it has
    one); a bad flag is one line (`error: …`) and exit status 2, like any other bad input."""

    def __init__(self, prog: str, description: str, epilog: str | None = None) -> None:
        super().__init__(
            prog=prog, description=description, epilog=epilog, formatter_class=_HelpFormatter
        )

    def error(self, message: str) -> NoReturn:
        fail(message)


class _HelpFormatter(argparse.HelpFormatter):
    """Each flag's help followed by its default, unless it has none (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default in (None, False, argparse.SUPPRESS) or "%(default)" in text:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)"
        return text
