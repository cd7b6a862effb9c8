"""SGD exactly as PyTorch runs it, with the recipe's per-epoch cosine schedule.

PyTorch SGD adds weight decay to the gradient *before* momentum (coupled decay) and starts
its momentum buffer at the first gradient; `optax.add_decayed_weights` followed by
`optax.sgd` does the same. Decay skips the original's `.bias` tensors: conv/dense biases and
BN shifts, which are all leaves named `bias` in our parameter tree.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax


@functools.cache
def cosine_per_epoch(base_lr: float, epochs: int, steps_per_epoch: int) -> optax.Schedule:
    """Epoch e (1-based) runs at base_lr·(1 + cos(π·e/T))/2, so the last epoch runs at 0."""
    if epochs <= 0 or steps_per_epoch <= 0:
        raise ValueError("epochs and steps_per_epoch must be positive")

    def schedule(count: jax.Array) -> jax.Array:
        epoch = jnp.minimum(count // steps_per_epoch + 1, epochs)
        return base_lr * 0.5 * (1.0 + jnp.cos(math.pi * epoch / epochs))

    return schedule


def cosine_per_step(base_lr: float, total_steps: int) -> optax.Schedule:
    """Step s (0-based) of `total_steps` runs at base_lr·(1 + cos(π·s/total))/2: from base_lr
    down to near 0 within the run, however few epochs it has (the quantize stage's)."""
    if total_steps <= 0:
        raise ValueError("total_steps must be positive")

    def schedule(count: jax.Array) -> jax.Array:
        return (
            base_lr * 0.5 * (1.0 + jnp.cos(math.pi * jnp.minimum(count, total_steps) / total_steps))
        )

    return schedule


def lr_at_epoch(base_lr: float, epochs: int, epoch: int) -> float:
    """The learning rate of 1-based `epoch`, as a Python float (for logs)."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def decay_mask(params: Any) -> Any:
    """True for every leaf that gets weight decay: everything not named `bias`."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) != "bias", params
    )


@functools.cache
def make_optimizer(
    base_lr: float,
    epochs: int,
    steps_per_epoch: int,
    momentum: float = 0.9,
    weight_decay: float = 1e-5,
    per_step: bool = False,
) -> optax.GradientTransformation:
    """PyTorch-equivalent SGD: coupled weight decay, momentum, no Nesterov, cosine per epoch
    (the recipe's) or, with `per_step`, per step.

    Cached (as is the schedule): equal settings give the same object, so stages and trials
    with equal settings share one compiled step.
    """
    if per_step:
        schedule = cosine_per_step(base_lr, epochs * steps_per_epoch)
    else:
        schedule = cosine_per_epoch(base_lr, epochs, steps_per_epoch)
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        optax.sgd(schedule, momentum=momentum),
    )
