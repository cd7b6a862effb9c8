"""Calibration images made from the network itself, for quantising with no data at hand.

A network trained with batch norm carries its training data's statistics in each BN layer's
running mean and variance. Images optimised so that, batch by batch, every BN layer's input
has those per-channel means and standard deviations (ZeroQ's "distilled data", Cai et al.
2020; DeepInversion's feature-statistics term, Yin et al. 2020) exercise the activation
ranges the network saw in training, which is what calibration needs.

The pixels are parameterised as 255·sigmoid(z), so they stay valid images; Adam moves z. The
loss per BN layer is scale-free: the mean's offset in units of the running standard
deviation, squared, plus the standard deviation's relative error, squared, averaged over the
channels, then over the layers. A small total-variation term keeps neighbouring pixels close,
as natural images are. Everything is seeded: the same network and seed give the same images.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from micronet_jax.data.augment import normalize
from micronet_jax.models.layers import GhostBatchNorm


@dataclasses.dataclass(frozen=True)
class Synthesis:
    """How synthetic calibration images are made."""

    batch_size: int = 64  # images optimised together (their statistics are matched jointly)
    iterations: int = 100
    learning_rate: float = 0.1  # Adam on the pixels' logits
    total_variation: float = 1e-4  # weight of the smoothness term
    epsilon: float = 1e-5


@dataclasses.dataclass
class _StatisticsRecorder:
    """Method interceptor: for every BN call (at test time), the input's per-channel batch
    mean and standard deviation beside the layer's running ones."""

    epsilon: float
    terms: list = dataclasses.field(default_factory=list)

    def __call__(self, next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        if isinstance(context.module, GhostBatchNorm) and context.method_name == "__call__":
            x = args[0].astype(jnp.float32)
            axes = tuple(range(x.ndim - 1))
            stats = context.module.variables["batch_stats"]
            running_std = jnp.sqrt(stats["var"] + self.epsilon)
            mean = jnp.mean(x, axis=axes)
            std = jnp.sqrt(jnp.var(x, axis=axes) + self.epsilon)
            self.terms.append(
                (
                    jnp.mean(jnp.square((mean - stats["mean"]) / running_std)),
                    jnp.mean(jnp.square(std / running_std - 1.0)),
                )
            )
        return next_fun(*args, **kwargs)


def statistics_mismatch(
    model: nn.Module, variables: dict, images: jax.Array, epsilon: float = 1e-5
) -> tuple[jax.Array, jax.Array]:
    """(mean, std) mismatch of `images` (float pixels in [0, 255], N×H×W×3) with the BN
    running statistics, averaged over the layers: 0 where every BN input matches."""
    recorder = _StatisticsRecorder(epsilon)
    with nn.intercept_methods(recorder):
        model.apply(variables, normalize(images), train=False)
    means, stds = zip(*recorder.terms, strict=True)
    return jnp.mean(jnp.stack(means)), jnp.mean(jnp.stack(stds))


def _total_variation(images: jax.Array) -> jax.Array:
    dx = images[:, 1:, :, :] - images[:, :-1, :, :]
    dy = images[:, :, 1:, :] - images[:, :, :-1, :]
    return (jnp.mean(jnp.abs(dx)) + jnp.mean(jnp.abs(dy))) / 255.0


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _synthesise_batch(model, options, shape, variables, key):
    logits = jax.random.normal(key, shape) * 0.5
    optimizer = optax.adam(options.learning_rate)

    def loss(z):
        images = 255.0 * jax.nn.sigmoid(z)
        mean_term, std_term = statistics_mismatch(model, variables, images, options.epsilon)
        return mean_term + std_term + options.total_variation * _total_variation(images)

    def step(carry, _):
        z, state = carry
        grads = jax.grad(loss)(z)
        updates, state = optimizer.update(grads, state, z)
        return (optax.apply_updates(z, updates), state), None

    (logits, _), _ = jax.lax.scan(
        step, (logits, optimizer.init(logits)), None, length=options.iterations
    )
    return 255.0 * jax.nn.sigmoid(logits)


def synthesise(
    model: nn.Module,
    variables: dict,
    count: int,
    options: Synthesis = Synthesis(),
    seed: int = 0,
    progress: Callable[[int], Any] | None = None,
) -> np.ndarray:
    """`count` uint8 images (count×32×32×3) whose BN statistics match `variables`' running
    ones, made `options.batch_size` at a time; `progress(total)` makes a bar."""
    if count <= 0:
        raise ValueError(f"count must be positive, got {count}")
    size = model.arch.input_size
    variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    batches = -(-count // options.batch_size)
    bar = progress(batches) if progress else None
    out = []
    for index in range(batches):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), index)
        shape = (options.batch_size, size, size, 3)
        images = _synthesise_batch(model, options, shape, variables, key)
        out.append(np.asarray(jnp.round(images), np.uint8))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return np.concatenate(out)[:count]
