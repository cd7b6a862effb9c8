"""Learn the integer network as the runtimes run it, against the float32 network.

The post-training integer graph (`onnx_int8`) loses predictions because one grid per
tensor cannot serve channels whose ranges differ by decades, and because every tensor is
rounded. Post-training methods move one layer or block at a time; here the whole integer
network (`integer_net.IntegerNetwork`: every kernel code, kernel scale, bias code, grid step
and zero point) learns by gradient descent (straight-through rounding) to give the float32
network's own predictions on unlabelled images: the loss is the KL divergence from the
teacher's soft predictions on both heads. The teacher is frozen, the pruned weights stay
zero, and what is learned is written back as codes and grids (`IntegerNetwork.to_onnx`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from micronet_jax.deploy.integer_net import IntegerNetwork
from micronet_jax.quant.learn import batches, kl_to_teacher, run_steps, teacher_fn

__all__ = ["LearnOptions", "feature_error", "kl_to_teacher", "learn", "teacher_fn"]


@dataclasses.dataclass(frozen=True)
class LearnOptions:
    """How the integer network learns (the export's `--learn_*` flags)."""

    steps: int = 500
    batch_size: int = 32
    kernel_lr: float = 0.05  # kernel and bias codes per step (Adam), cosine to zero
    grid_lr: float = 0.005  # kernel scales and grid steps, as multiples of their start
    zero_lr: float = 0.05  # zero points, in codes
    augment: bool = True  # random flips and 4-pixel shifts of the unlabelled images
    feature_weight: float = 10.0  # every gridded tensor's normalised error to the float one
    seed: int = 0


def optimizer(net: IntegerNetwork, params: dict, options: LearnOptions):
    def schedule(lr: float) -> optax.Schedule:
        return optax.cosine_decay_schedule(lr, max(options.steps, 1))

    groups = {
        "kernels": "codes",
        "biases": "codes",
        "scales": "grids",
        "steps": "grids",
        "zeros": "zeros",
    }
    labels = {
        name: jax.tree_util.tree_map(lambda _, g=g: g, params[name]) for name, g in groups.items()
    }
    for root in net.fixed:
        labels["steps"][root] = labels["zeros"][root] = "fixed"
    return optax.multi_transform(
        {
            "codes": optax.adam(schedule(options.kernel_lr)),
            "grids": optax.adam(schedule(options.grid_lr)),
            "zeros": optax.adam(schedule(options.zero_lr)),
            "fixed": optax.set_to_zero(),
        },
        labels,
    )


def feature_error(student: dict, teacher: dict) -> jax.Array:
    """The mean over gridded tensors of each one's squared error to the float network's
    value, relative to that value's mean square."""
    errors = [
        jnp.mean((student[k] - teacher[k]) ** 2) / (jnp.mean(teacher[k] ** 2) + 1e-8)
        for k in teacher
    ]
    return jnp.mean(jnp.stack(errors))


def learn(
    net: IntegerNetwork,
    teacher: Callable[[Any], tuple],
    images: np.ndarray,
    options: LearnOptions = LearnOptions(),
    params: dict | None = None,
    progress: Callable[[int], Any] | None = None,
    float_params: dict | None = None,
) -> tuple[dict, list[float]]:
    """`net`'s parameters learned on `images` (uint8, the graph's input) to give `teacher`'s
    outputs (a function of the same images, the graph's output order) and, with
    `float_params` (`integer_net.float_params`) and a feature weight, each gridded tensor
    the float network's value of it (block-wise targets); the loss per step."""
    params = net.init_params() if params is None else params
    tx = optimizer(net, params, options)
    state = tx.init(params)
    features = float_params is not None and options.feature_weight > 0

    def loss_fn(p, batch, target, target_features):
        if not features:
            return kl_to_teacher(net.apply(p, batch), target)
        outputs, captured = net.apply(p, batch, capture=True)
        return kl_to_teacher(outputs, target) + options.feature_weight * feature_error(
            captured, target_features
        )

    @jax.jit
    def step(p, s, batch):
        target = jax.lax.stop_gradient(teacher(batch))
        target_features = None
        if features:
            _, target_features = net.apply(float_params, batch, quantised=False, capture=True)
            target_features = jax.lax.stop_gradient(target_features)
        loss, grads = jax.value_and_grad(loss_fn)(p, batch, target, target_features)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    def run(state, batch):
        p, s, loss = step(*state, batch)
        return (p, s), loss

    stream = batches(images, options.steps, options.batch_size, options.augment, options.seed)
    (params, _), losses = run_steps(run, (params, state), stream, options.steps, progress)
    return params, losses
