"""The main command's command line: `--config=FILE[:VARIANT]`, its `--config.KEY=VALUE`
overrides and `--workdir`, with `--help` in every command's layout and each mistake (a
missing or broken config file, an unknown key, a wrong type) as one line and exit status 2.

The flags are absl's, since the config file flag and its overrides come from
ml_collections' config flags.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from absl import flags
from ml_collections import config_flags

from micronet_jax.errors import CommandParser, fail

CONFIG_HELP = "a config file, with an optional variant: configs/reproduce.py:final"
WORKDIR_HELP = "directory for checkpoints, metrics and reports (a rerun resumes it)"
CONFIG = config_flags.DEFINE_config_file("config", None, CONFIG_HELP, lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, WORKDIR_HELP)


def loaded_config() -> Any:
    """The parsed config; a config file that failed to load (a syntax error, an unknown
    variant) is one line and exit status 2, like any other bad flag."""
    try:
        config = CONFIG.value
    except OSError as exc:  # ml_collections defers the loading error to the first access
        cause = exc.__cause__ or exc.__context__ or exc
        reason = str(cause).strip().splitlines()[-1].strip()
        fail(f"--config could not be loaded: {reason}")
    if config is None:
        fail("--config is required, e.g. --config=configs/reproduce.py")
    return config


def _unquote(text: str) -> str:
    while len(text) > 1 and text[0] in "'\"" and text[-1] == text[0]:
        text = text[1:-1]
    return text


def _flag_message(exc: Exception, argv: list[str]) -> str:
    """One line: the unknown key with the flag that named it, or the parser's message."""
    text = _unquote(str(exc)) or type(exc).__name__
    if isinstance(exc, KeyError | AttributeError):
        named = [a.split("=")[0] for a in argv[1:] if f".{text}" in a.split("=")[0]]
        where = f" (in {named[0]})" if named else ""
        return f"unknown config key {text!r}{where}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):  # "Error whilst parsing config file:" + why
        return f"{lines[0]} {lines[-1]}"
    return lines[0] if lines else text


def config_path_of(argv: list[str]) -> str | None:
    """The file named by --config (without its ':variant'), if given."""
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        else:
            continue
        return value.split(":", 1)[0]
    return None


def existing_configs(path: str) -> list[str]:
    """Config files a user may have meant: beside `path`, else in ./configs or the package's."""
    folders = [Path(path).parent, Path("configs"), Path(__file__).resolve().parents[2] / "configs"]
    for folder in folders:
        found = sorted(str(f) for f in folder.glob("*.py") if f.name != "__init__.py")
        if found and folder.is_dir():
            return found
    return []


def check_config_file(argv: list[str]) -> None:
    """A missing config file is one line naming it and the configs that exist; exit 2."""
    path = config_path_of(argv)
    if path is None or Path(path).is_file():
        return
    known = existing_configs(path)
    hint = f"; configs: {', '.join(known)}" if known else ""
    fail(f"--config: no config file {path}{hint}")


def help_parser() -> CommandParser:
    """The command line as `--help` shows it, laid out as every other command's help."""
    parser = CommandParser(
        prog="python -m micronet_jax.main",
        description="Train, prune, evaluate or quantise a MicroNet: the job is the config's "
        "`mode` (train: stage A; pipeline: the whole recipe; test: evaluate and score a "
        "checkpoint; quantize: quantisation-aware training of one).",
        epilog="configs: "
        + ", ".join(existing_configs("configs/x.py"))
        + ". Example: python -m micronet_jax.main --config=configs/reproduce.py "
        "--workdir=runs/repro",
    )
    parser.add_argument("--config", metavar="FILE[:VARIANT]", help=CONFIG_HELP)
    parser.add_argument(
        "--config.KEY",
        metavar="VALUE",
        help="override one config field, e.g. --config.train.batch_size=256 (repeatable; "
        "unknown keys and wrong types are refused)",
    )
    parser.add_argument("--workdir", metavar="DIR", help=WORKDIR_HELP)
    parser.add_argument("--helpfull", action="store_true", help="absl's list of every flag")
    return parser


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, but `--help` in the commands' shared layout, and a bad override
    (unknown key, wrong type) or a missing config file one line, no traceback."""
    if any(arg in ("-h", "--help") for arg in argv[1:]):
        help_parser().print_help()
        sys.exit(0)
    check_config_file(argv)
    try:
        return flags.FLAGS(argv)
    except Exception as exc:  # noqa: BLE001 - ml_collections raises Key/Attribute/Type errors
        fail(f"bad command line: {_flag_message(exc, argv)} (--help lists the flags)")
