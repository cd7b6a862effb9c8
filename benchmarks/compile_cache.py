"""Time to the first train step: a fresh start vs a start with the persistent compilation cache.

    python -m benchmarks.compile_cache [--model smoke|full] [--batch 64]

Runs the same start twice in new processes sharing a fresh cache directory: import, build
the model and state of the config, compile and run one train step (AutoAugment, mixup, the
update) — the work a resumed or repeated run does before its first step.
"""

from __future__ import annotations

import time

_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

from micronet_jax import default_config  # noqa: E402
from micronet_jax.errors import CommandParser  # noqa: E402

RECIPE = default_config()  # the recipe's values, not retyped


def first_step(model_size: str, batch: int) -> float:
    """Seconds from process start until one real train step has run."""
    import functools

    import jax
    import numpy as np

    from micronet_jax import (
        create_train_state,
        default_config,
        enable_compilation_cache,
        init_variables,
        make_optimizer,
        train_step,
    )
    from micronet_jax.config import builders
    from micronet_jax.train.loop import run_batch

    enable_compilation_cache(os.environ["MICRONET_CACHE_DIR"])
    config = default_config()
    if model_size == "smoke":
        config.model.block_strings = (
            "r1_k3_s1_e1_i16_o16_se0.25",
            "r1_k3_s2_e4_i16_o24_se0.25",
            "r1_k3_s1_e4_i24_o24_se0.25",
        )
        config.model.width, config.model.resolution, config.model.head_filters = 1.0, 1.0, 64
    model = builders.model_from_config(config)
    tx = make_optimizer(RECIPE.train.lr, 10, 10)
    state = create_train_state(model.apply, init_variables(model, jax.random.key(0)), tx, 0)
    step_fn = functools.partial(train_step, cfg=builders.step_config_of(config, 10, 10))
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8))
    labels = jax.device_put(rng.integers(0, 100, (batch,)).astype(np.int32))
    perm = jax.numpy.arange(batch)
    state, metrics = run_batch(state, images, labels, perm, 0, step_fn=step_fn, batch_size=batch)
    jax.block_until_ready(metrics)
    return time.perf_counter() - _START


def main() -> None:
    parser = CommandParser(
        prog="python -m benchmarks.compile_cache", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", choices=("smoke", "full"), default="smoke")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps({"seconds": first_step(args.model, args.batch)}))
        return
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, MICRONET_CACHE_DIR=cache)
        command = [
            sys.executable,
            "-m",
            "benchmarks.compile_cache",
            "--child",
            f"--model={args.model}",
            f"--batch={args.batch}",
        ]
        times = []
        for _ in range(2):
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            times.append(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])
    print(f"model {args.model}, batch {args.batch}: time to the first train step")
    print(f"  first start (empty cache) : {times[0]:7.1f} s")
    print(f"  second start (cached)    : {times[1]:7.1f} s")
    print(f"  speed-up                 : {times[0] / times[1]:7.1f}x")


if __name__ == "__main__":
    main()
