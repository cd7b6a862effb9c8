"""Train-time augmentation speed: the JAX pipeline on the device vs the original's PIL way.

Both sides run the whole per-batch pipeline on the same real CIFAR-10 test images:
AutoAugment (CIFAR-100 policy) → random crop (zero padding 4) → flip → normalise → mixup.
JAX: one jitted function per batch (batch gathered from device memory, key from fold_in);
PIL: one image at a time in Python with the ops of ``tests/pil_reference.py``, then numpy.

    python -m benchmarks.augment [--batch 128] [--batches 20] [--repeats 5]
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import pil_reference  # noqa: E402

from benchmarks.shared_data import CIFAR10_ARCHIVE  # noqa: E402
from micronet_jax.data import augment, policy  # noqa: E402
from micronet_jax.errors import CommandParser  # noqa: E402

DEFAULT_ARCHIVE = CIFAR10_ARCHIVE


def make_augment_step(batch: int):
    """A jitted (key, step, images, labels) → mixed batch, as a train step would run it."""

    @jax.jit
    def step(key, index, images, labels):
        rows = (index * batch + jnp.arange(batch)) % images.shape[0]
        key = jax.random.fold_in(key, index)
        aug_key, mix_key = jax.random.split(key)
        x = augment.train_transform(aug_key, images[rows])
        return augment.mixup(mix_key, x, labels[rows])

    return step


def time_jax(images, labels, batch: int, batches: int, repeats: int) -> list[float]:
    """Images/s of each repeat (``batches`` batches each), after compilation."""
    step = make_augment_step(batch)
    images, labels = jax.device_put(images), jax.device_put(labels)
    key = jax.random.key(0)
    jax.block_until_ready(step(key, 0, images, labels))
    rates = []
    for r in range(repeats):
        start = time.perf_counter()
        for i in range(batches):
            out = step(key, r * batches + i, images, labels)
        jax.block_until_ready(out)
        rates.append(batches * batch / (time.perf_counter() - start))
    return rates


def time_pil(images, labels, batch: int, batches: int, repeats: int) -> list[float]:
    """Images/s of each repeat of the per-image PIL pipeline on the same images."""
    rng = random.Random(0)
    rows = policy.CIFAR100_ROWS
    rates = []
    for r in range(repeats):
        start = time.perf_counter()
        for i in range(batches):
            first = ((r * batches + i) * batch) % (len(images) - batch)
            pil_reference.train_batch(
                images[first : first + batch], labels[first : first + batch], rows, rng
            )
        rates.append(batches * batch / (time.perf_counter() - start))
    return rates


def main(argv: list[str] | None = None) -> None:
    parser = CommandParser(prog="python -m benchmarks.augment", description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=DEFAULT_ARCHIVE)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=20, help="batches per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--train_step_ips",
        type=float,
        default=None,
        help="images/s of a train step, to print the augmentation's share of a step",
    )
    args = parser.parse_args(argv)

    images, labels = pil_reference.cifar10_test_images(str(args.archive))
    print(
        f"{jax.devices()[0].platform} ({jax.device_count()} device), batch {args.batch}, "
        f"{args.batches} batches x {args.repeats} repeats, median"
    )
    jax_ips = statistics.median(time_jax(images, labels, args.batch, args.batches, args.repeats))
    pil_ips = statistics.median(time_pil(images, labels, args.batch, args.batches, args.repeats))
    print(f"JAX (jit, on device)      {jax_ips:10,.0f} images/s")
    print(f"PIL (per image) + numpy   {pil_ips:10,.0f} images/s")
    print(f"ratio JAX / PIL           {jax_ips / pil_ips:10.2f}x")
    if args.train_step_ips:
        share = args.train_step_ips / jax_ips
        print(
            f"train step {args.train_step_ips:,.0f} images/s: augmentation is "
            f"{100 * share:.1f}% of a step's time"
        )


if __name__ == "__main__":
    main()
