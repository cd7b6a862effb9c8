"""Command line: `python -m micronet_jax.main --config=configs/<name>.py --workdir=DIR`.

`config.mode` picks the job: `train` (stage A), `pipeline` (the whole recipe) or `test`
(evaluate and score a checkpoint). Mistakes a user can make are printed as one message.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from micronet_jax.errors import MicronetError
from micronet_jax.runtime import enable_compilation_cache

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")


def run(config, workdir: str | None) -> None:
    """Dispatch on `config.mode`."""
    mode = config.mode
    if mode in ("train", "pipeline") and not workdir:
        raise MicronetError("--workdir is required for training")
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
        enable_compilation_cache(_CONFIG.value.compilation_cache)
        run(_CONFIG.value, _WORKDIR.value)
    except MicronetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
