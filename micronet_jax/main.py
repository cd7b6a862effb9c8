"""Command line: `python -m micronet_jax.main --config=configs/<name>.py --workdir=DIR`.

`config.mode` picks the job: `train` (stage A), `pipeline` (the whole recipe) or `test`
(evaluate and score a checkpoint). Mistakes a user can make are printed as one message:
bad flags exit with status 2, bad values, data or checkpoints with 1, and a run stopped by
SIGINT/SIGTERM (after saving a checkpoint to resume from) with 128 + the signal number.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from micronet_jax.errors import MicronetError
from micronet_jax.runtime import enable_compilation_cache, use_cpu_cores
from micronet_jax.train.guard import Interrupted
from micronet_jax.train.sharding import initialize_distributed
from micronet_jax.validate import check_resume, validate_config

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")


def run(config, workdir: str | None) -> None:
    """Validate everything that can be checked cheaply, then dispatch on `config.mode`."""
    validate_config(config, workdir)
    check_resume(config, workdir)
    mode = config.mode
    if mode == "train":
        from micronet_jax.train.loop import train_and_evaluate

        train_and_evaluate(config, workdir)
    elif mode == "pipeline":
        from micronet_jax.pipeline import run_pipeline

        run_pipeline(config, workdir)
    elif mode == "test":
        from micronet_jax.pipeline import run_test

        run_test(config, workdir)
    else:
        raise MicronetError(f"config.mode must be train, pipeline or test, got {mode!r}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config=configs/reproduce.py")
    logging.set_verbosity(logging.WARNING)
    try:
        if _CONFIG.value.cpu_devices != 1:
            use_cpu_cores(_CONFIG.value.cpu_devices or None)
        enable_compilation_cache(_CONFIG.value.compilation_cache)
        initialize_distributed(_CONFIG.value.distributed)
        run(_CONFIG.value, _WORKDIR.value)
    except Interrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except MicronetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


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
    return text.splitlines()[0] if text else text


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, but a bad override (unknown key, wrong type) is one line, no traceback."""
    try:
        return flags.FLAGS(argv)
    except Exception as exc:  # noqa: BLE001 - ml_collections raises Key/Attribute/Type errors
        print(f"error: bad command line: {_flag_message(exc, argv)}", file=sys.stderr)
        print("Pass --helpfull to see the flags.", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
