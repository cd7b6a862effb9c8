"""A training epoch through the real loop, and how much of it is not the train step.

    python -m benchmarks.epoch [--model tiny|full] [--num_images 2560] [--batch 128]

Runs `loop.run_epoch` with `steps.train_step` (on-device shuffle, gather, AutoAugment, crop,
flip, mixup, step) on real CIFAR-10 images. Then times the pure step (forward, backward,
update) on batches gathered and augmented beforehand, for the same batches. The non-step
share is 1 − pure / epoch: gather, augmentation, dispatch and Python overhead together.
The two are measured alternately (epoch, pure, epoch, ...) and medians are reported.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from pathlib import Path

import jax

from benchmarks.shared_data import CIFAR10_ARCHIVE
from benchmarks.train_step import make_train_step_without_augmentation
from micronet_jax import (
    DeviceData,
    MicroNet,
    Schedule,
    StepConfig,
    build_architecture,
    create_train_state,
    default_config,
    init_variables,
    load_train_test,
    make_optimizer,
    run_epoch,
    train_step,
)
from micronet_jax.errors import CommandParser
from micronet_jax.train.state import STEP_STREAM, stream_key
from micronet_jax.train.steps import augment_batch

RECIPE = default_config()  # the recipe's values, not retyped

ROOT = Path(__file__).resolve().parents[1]


def architecture(name: str):
    if name == "full":
        return build_architecture(num_classes=10)
    sys.path.insert(0, str(ROOT / "tests"))
    from configs.tiny import get_config

    m = get_config().model
    return build_architecture(
        tuple(m.block_strings), m.width, m.depth, m.resolution, m.head_filters, num_classes=10
    )


def fresh_state(model, steps_per_epoch: int):
    variables = init_variables(model, jax.random.key(0))
    tx = make_optimizer(RECIPE.train.lr, 10, steps_per_epoch)
    return create_train_state(model.apply, variables, tx, seed=0)


def pre_augmented(state, data: DeviceData, schedule: Schedule, cfg: StepConfig) -> list:
    """The epoch's batches, gathered and augmented ahead of time (not timed)."""

    @jax.jit
    def prepare(perm, start, step):
        idx = jax.lax.dynamic_slice(perm, (start,), (schedule.batch_size,))
        key = stream_key(state.rng, STEP_STREAM, step)
        return augment_batch(key, data.images[idx], data.labels[idx], cfg)

    perm = jax.random.permutation(jax.random.key(1), len(data))
    starts = range(0, schedule.steps_per_epoch * schedule.batch_size, schedule.batch_size)
    return [jax.block_until_ready(prepare(perm, s, i)) for i, s in enumerate(starts)]


def time_epoch(state, step_fn, data, schedule, epoch):
    tic = time.perf_counter()
    state, metrics = run_epoch(state, step_fn, data, schedule, epoch)
    jax.block_until_ready(state)
    return state, time.perf_counter() - tic


def time_pure(state, pure, batches):
    tic = time.perf_counter()
    for x, la, lb, lam in batches:
        state, loss = pure(state, x, la, lb, lam)
    jax.block_until_ready((state, loss))
    return state, time.perf_counter() - tic


def main() -> None:
    p = CommandParser(prog="python -m benchmarks.epoch", description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("tiny", "full"), default="tiny")
    p.add_argument("--num_images", type=int, default=2560)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data", default=str(CIFAR10_ARCHIVE))
    args = p.parse_args()

    train, _ = load_train_test("cifar10", args.data, download=False)
    n = min(args.num_images, len(train))
    data = DeviceData.from_numpy(train.images[:n], train.labels[:n])
    schedule = Schedule(epochs=10, batch_size=args.batch, num_examples=n, drop_last=True)
    model = MicroNet(arch=architecture(args.model))
    cfg = StepConfig()
    step_fn = functools.partial(train_step, cfg=cfg)
    pure = jax.jit(make_train_step_without_augmentation(), donate_argnums=(0,))

    state = fresh_state(model, schedule.steps_per_epoch)
    batches = pre_augmented(state, data, schedule, cfg)
    tic = time.perf_counter()
    state, _ = time_epoch(state, step_fn, data, schedule, 1)  # compiles
    first = time.perf_counter() - tic
    pstate = fresh_state(model, schedule.steps_per_epoch)
    pstate, _ = time_pure(pstate, pure, batches[:1])  # compiles
    epochs, pures = [], []
    for r in range(args.repeats):
        state, t = time_epoch(state, step_fn, data, schedule, r + 2)
        epochs.append(t)
        pstate, t = time_pure(pstate, pure, batches)
        pures.append(t)
    e, s = statistics.median(epochs), statistics.median(pures)
    images = schedule.steps_per_epoch * args.batch
    print(
        f"model {args.model}, {images} CIFAR-10 images/epoch, batch {args.batch}, "
        f"{jax.devices()[0].platform}, {args.repeats} alternating repeats"
    )
    print(f"first epoch (with compile): {first:.1f} s")
    print(f"epoch: median {e:.2f} s  {images / e:.1f} images/s")
    print(f"pure step on pre-augmented batches: median {s:.2f} s  {images / s:.1f} images/s")
    print(f"non-step share of the epoch: {100 * (1 - s / e):.1f}%")


if __name__ == "__main__":
    main()
