"""Command line: `python -m micronet_jax.main --config=configs/<name>.py --workdir=DIR`.

`config.mode` picks the job: `train` (stage A), `pipeline` (the whole recipe), `test`
(evaluate and score a checkpoint) or `quantize` (quantisation-aware training of a checkpoint).
Mistakes a user can make are printed as one line, `error: …`: bad flags, bad config values,
missing or damaged data or checkpoints and multi-host launches that cannot start (no
coordinator, a missing peer, processes with different configs) exit with status 2; a run that
failed on its own (training diverged, a host was lost) with 1; a run stopped by SIGINT/SIGTERM
(after saving a checkpoint to resume from) with 128 + the signal number; a multi-host job
that a preemption notice stopped at one agreed step with 0.

The command line itself (flags, `--help`, one-line flag errors) is config/command_line.py.
"""

from __future__ import annotations

import sys

from absl import app, logging
from jax.errors import JaxRuntimeError

from micronet_jax.backend import enable_compilation_cache, use_cpu_cores
from micronet_jax.config import command_line
from micronet_jax.config.validate import validate_config
from micronet_jax.config.workdir import check_resume
from micronet_jax.errors import MicronetError, fail
from micronet_jax.recipe import pipeline
from micronet_jax.recipe.launch import check_same_launch, join
from micronet_jax.train.guard import Interrupted

MODES = {
    "train": pipeline.train_and_evaluate,
    "pipeline": pipeline.run_pipeline,
    "test": pipeline.run_test,
    "quantize": pipeline.run_quantize,
}


def run(config, workdir: str | None) -> None:
    """Validate everything that can be checked cheaply, then dispatch on `config.mode`."""
    validate_config(config, workdir)
    check_resume(config, workdir)
    if config.mode not in MODES:
        raise MicronetError(f"config.mode must be one of {', '.join(MODES)}, got {config.mode!r}")
    MODES[config.mode](config, workdir)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    config = command_line.loaded_config()
    workdir = command_line.WORKDIR.value
    logging.set_verbosity(logging.WARNING)
    job, status, message = None, 0, None
    try:
        if config.cpu_devices != 1:
            use_cpu_cores(config.cpu_devices or None)
        enable_compilation_cache(config.compilation_cache)
        job = join(config)
        check_same_launch(job, config, workdir)
        run(config, workdir)
    except Interrupted as exc:
        status, message = exc.exit_status, f"interrupted: {exc}"
    except MicronetError as exc:
        status, message = exc.exit_status, f"error: {exc}"
    except JaxRuntimeError:
        if job is not None:  # a collective failed: most likely a peer is gone
            job.explain_failure()
        raise
    if message:
        print(message, file=sys.stderr, flush=True)
    if job is not None:
        job.leave(finished=status == 0)  # stopped together or finished: leave together
    if status:
        sys.exit(status)


if __name__ == "__main__":
    app.run(main, flags_parser=command_line.parse_flags)
