"""One CPU device per core against one device, for eval and for training, in one process.

    python -m benchmarks.cpu_devices [--devices 0] [--eval-images 2048] [--train-images 640]
                                     [--repeats 4]

The process gets `--devices` CPU devices (0: one per core). Eval: the full model's eval pass
(`map_eval_batch`, as `steps.predict_step` runs it) over batches of 512 real CIFAR-10 test
images, split over the devices against the same micro-batched pass on device 0 alone.
Training: full-model epochs of `loop.run_epoch` (AutoAugment, batch 128) with the batch split
over a data mesh of the devices against one device. Both sides of each pair run alternately;
medians are printed.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))

from micronet_jax import default_config, use_cpu_cores
from micronet_jax.errors import CommandParser

RECIPE = default_config()  # the recipe's values, not retyped


def eval_rates(images, repeats: int) -> dict[str, float]:
    import jax.numpy as jnp
    import numpy as np

    from micronet_jax import MicroNet, build_architecture, eval_transform, init_variables
    from micronet_jax.models.microbatch import map_eval_batch

    model = MicroNet(build_architecture())
    variables = init_variables(model, jax.random.key(0))

    @functools.partial(jax.jit, static_argnums=2)
    def eval_pass(variables, x, split):
        def forward(batch):
            return model.apply(variables, eval_transform(batch))[0]

        return map_eval_batch(forward, x, split)

    runners = {
        "split": lambda b: np.asarray(eval_pass(variables, jnp.asarray(b), True)),
        "one device": lambda b: np.asarray(
            eval_pass(variables, jax.device_put(b, jax.devices()[0]), False)
        ),
    }
    batches = [images[i : i + 512] for i in range(0, len(images), 512)]
    for run in runners.values():
        run(batches[0])  # compile
    seconds = {name: [] for name in runners}
    for rep in range(repeats):
        order = list(runners) if rep % 2 == 0 else list(runners)[::-1]
        for name in order:
            tic = time.perf_counter()
            for batch in batches:
                runners[name](batch)
            seconds[name].append(time.perf_counter() - tic)
    return {name: len(images) / statistics.median(s) for name, s in seconds.items()}


def train_rates(images, repeats: int) -> dict[str, float]:
    import numpy as np

    from micronet_jax import (
        DeviceData,
        MicroNet,
        Schedule,
        StepConfig,
        build_architecture,
        create_train_state,
        init_variables,
        make_optimizer,
        run_epoch,
        train_step,
    )
    from micronet_jax.distributed import sharding

    model = MicroNet(build_architecture())
    labels = np.random.default_rng(0).integers(0, 100, len(images)).astype(np.int32)
    schedule = Schedule(epochs=repeats + 1, batch_size=128, num_examples=len(images))
    step = functools.partial(train_step, cfg=StepConfig(autoaugment=True))
    variables = init_variables(model, jax.random.key(0))
    tx = make_optimizer(RECIPE.train.lr, repeats + 1, schedule.steps_per_epoch)
    setups = {}
    for name, mesh in (("split", sharding.make_mesh()), ("one device", None)):
        # a copy each: the epoch donates its state
        state = create_train_state(model.apply, jax.tree.map(np.array, variables), tx, seed=0)
        setups[name] = [
            sharding.place_state(state, mesh),
            DeviceData.from_numpy(images, labels, mesh),
        ]
    seconds = {name: [] for name in setups}
    for rep in range(repeats + 1):  # the first epoch of each compiles
        order = list(setups) if rep % 2 == 0 else list(setups)[::-1]
        for name in order:
            state, data = setups[name]
            tic = time.perf_counter()
            state, _ = run_epoch(state, step, data, schedule, epoch=rep + 1)
            jax.block_until_ready(state)
            if rep:
                seconds[name].append(time.perf_counter() - tic)
            setups[name][0] = state
    return {name: len(images) / statistics.median(s) for name, s in seconds.items()}


def main() -> None:
    parser = CommandParser(
        prog="python -m benchmarks.cpu_devices", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--devices", type=int, default=0, help="CPU devices (0: one per core)")
    parser.add_argument("--eval-images", type=int, default=2048)
    parser.add_argument("--train-images", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    devices = use_cpu_cores(args.devices or None)
    from early_exit import load_images

    print(f"{devices} CPU devices; full model")
    rates = eval_rates(load_images(args.eval_images), args.repeats)
    print(
        f"eval, batch 512   : split {rates['split']:7.1f} images/s, one device "
        f"{rates['one device']:7.1f} -> {rates['split'] / rates['one device']:.2f}x"
    )
    rates = train_rates(load_images(args.train_images), args.repeats)
    print(
        f"training, batch 128: split {rates['split']:7.1f} images/s, one device "
        f"{rates['one device']:7.1f} -> {rates['split'] / rates['one device']:.2f}x"
    )


if __name__ == "__main__":
    main()
