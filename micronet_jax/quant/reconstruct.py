"""Block reconstruction: activation grids (and the weights' rounding) learned segment by
segment, with activations quantised in the loop.

Rounding each kernel to its grid and calibrating each activation grid on its own histogram
leaves the activation grids as the measured bottleneck of this network: its swish and
squeeze-excite outputs are what a per-tensor grid fits worst. Here every segment of the
forward pass (the stem, each block, the exit head, the head) is run on the calibration
images with its layers' inputs on their grids and its kernels on theirs, and its output is
pulled towards the float32 network's by gradient descent on

- the **step size and zero point** of every activation grid in the segment (LSQ, Esser et al.
  2020, with LSQ+'s learned offset: rounding passes its gradient straight through, so a step
  learns how much it clips against how finely it rounds);
- with `rounding`, each kernel's **rounding up or down** (BRECQ, Li et al. 2021: AdaRound's
  soft rounding, learned for the whole block at once, the regulariser annealed so that every
  weight ends on a grid point);
- with `drop` > 0, **QDrop** (Wei et al. 2022): each activation is quantised only with
  probability 1 − drop in each step, so the grids are learned for a network whose other
  activations may or may not be quantised, which generalises better from few images.

Each segment reads the previous segments' quantised output (what the deployed network sees)
and is compared with the float32 network's output on the float32 input. A segment's result is
kept only when its reconstruction error on the calibration images is below the one it started
from; the grids stay valid (an integer zero point in range, a positive step; weights integer
codes within the grid and pruned weights zero).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from micronet_jax.quant.fake import (
    LayerInputGrids,
    activation_grid,
    qmax,
    round_scale,
    scale_key,
)
from micronet_jax.quant.widths import FULL, INTEGER_BELOW, BitWidths

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretched sigmoid, so the soft rounding reaches 0 and 1


@dataclasses.dataclass(frozen=True)
class Reconstruction:
    """How long and how fast a segment is reconstructed."""

    iterations: int = 400
    batch_size: int = 32
    step_learning_rate: float = 4e-3  # Adam on log step size: about 0.4% per step at most
    zero_learning_rate: float = 0.05  # Adam on the zero point, in grid codes
    rounding_learning_rate: float = 1e-2  # Adam on AdaRound's V
    regularisation: float = 0.01  # weight of the term that drives roundings to 0 or 1
    drop: float = 0.0  # QDrop's probability of leaving an activation unquantised


@dataclasses.dataclass
class SegmentReport:
    """A segment's reconstruction error (mean squared output difference over the calibration
    images, relative to the float32 output's mean square) before and after learning."""

    segment: str
    error_before: float
    error_after: float
    kept: bool


def ste_round(x: jax.Array) -> jax.Array:
    """Round to nearest, with the gradient of the identity."""
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def learned_grid_quant(
    x: jax.Array, step: jax.Array, zero: jax.Array, bits: int, scale_bits: int = FULL
) -> jax.Array:
    """x on the affine grid of 2^bits levels with a learnable step and zero point (LSQ+):
    the codes are rounded with straight-through gradients, so both the step and the zero
    point receive the gradient of what they clip and how they round."""
    levels = 2**bits - 1
    step = step + jax.lax.stop_gradient(round_scale(step, scale_bits) - step)
    zero = ste_round(jnp.clip(zero, 0.0, levels))
    codes = jnp.clip(ste_round(x / step) + zero, 0.0, levels)
    return (codes - zero) * step


def grid_bounds(step: jax.Array, zero: jax.Array, bits: int, scale_bits: int) -> jax.Array:
    """The (low, high) a learned (step, zero point) is stored as: `activation_grid` of them
    gives back the same step and zero point."""
    levels = 2**bits - 1
    step = round_scale(jnp.asarray(step, jnp.float32), scale_bits)
    zero = jnp.round(jnp.clip(zero, 0.0, levels))
    return jnp.stack([-zero * step, (levels - zero) * step]).astype(jnp.float32)


@dataclasses.dataclass
class _LearnedQuantizer(LayerInputGrids):
    """Method interceptor for a segment under reconstruction: every conv and dense layer's
    input on its learned grid (`grids`: scale_key -> (log step, zero point)); with
    `drop`, each activation kept in float32 with that probability (QDrop)."""

    bits: BitWidths
    grids: dict[str, tuple[jax.Array, jax.Array]]
    key: jax.Array
    drop: jax.Array
    calls: list = dataclasses.field(default_factory=list)

    def on_grid(self, path: str, x: jax.Array, bits: int) -> jax.Array:
        log_step, zero = self.grids[scale_key(path)]
        quantized = learned_grid_quant(x, jnp.exp(log_step), zero, bits, self.bits.scale_bits)
        key = jax.random.fold_in(self.key, len(self.calls))
        self.calls.append(path)
        keep = jax.random.uniform(key, x.shape) >= self.drop
        return jnp.where(keep, quantized, x)


def _soft(v: jax.Array) -> jax.Array:
    return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class _Problem:
    """What stays fixed while a segment learns (hashable: the jitted functions' statics)."""

    model: nn.Module
    bits: BitWidths
    run: Callable
    kernels: tuple[str, ...]  # integer kernels of the segment
    grids: tuple[str, ...]  # scale keys of the segment's integer activation grids
    nest: Callable


def _segment_loss(problem, params, fixed, learned, x_q, target, key, drop, rounding_on, beta):
    """(relative squared error of the segment's output, the rounding regulariser)."""
    flat = dict(params)
    reg = 0.0
    for path in problem.kernels:
        floor, scale, mask, codes = fixed[path]
        soft = jnp.clip(floor + _soft(learned["v"][path]), *_code_range(problem, path))
        flat[path] = jnp.where(rounding_on, soft, codes) * scale * mask
        h = _soft(learned["v"][path])
        reg += jnp.sum(mask * (1 - jnp.abs(2 * h - 1) ** beta)) / jnp.maximum(jnp.sum(mask), 1)
    grids = {k: (learned["log_step"][k], learned["zero"][k]) for k in problem.grids}
    quantizer = _LearnedQuantizer(problem.bits, grids, key, drop)
    with nn.intercept_methods(quantizer):
        out = problem.model.apply(
            {"params": problem.nest(flat), "batch_stats": fixed["batch_stats"]},
            x_q,
            train=False,
            method=problem.run,
        )
    error = jnp.mean(jnp.square(out - target)) / jnp.maximum(jnp.mean(jnp.square(target)), 1e-12)
    return error, reg


def _code_range(problem: _Problem, path: str) -> tuple[int, int]:
    q = qmax(problem.bits.of(path)[0])
    return -q, q


@functools.partial(jax.jit, static_argnums=(0,))
def _evaluate(problem, params, fixed, learned, inputs, targets, rounding_on):
    """The segment's relative error over all calibration images (no drop, hard rounding)."""
    hard = dict(learned, v={p: jnp.where(v >= 0, 1e4, -1e4) for p, v in learned["v"].items()})

    def one(carry, batch):
        x, t = batch
        error, _ = _segment_loss(
            problem, params, fixed, hard, x, t, jax.random.PRNGKey(0), 0.0, rounding_on, 2.0
        )
        return carry + error, None

    total, _ = jax.lax.scan(one, 0.0, (inputs, targets))
    return total / inputs.shape[0]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _learn(problem, options, params, fixed, learned, inputs, targets, key, rounding_on):
    """`options.iterations` Adam steps on minibatches drawn from the calibration batches."""
    inputs_flat = inputs.reshape(-1, *inputs.shape[2:])
    targets_flat = targets.reshape(-1, *targets.shape[2:])
    rates = {
        "log_step": options.step_learning_rate,
        "zero": options.zero_learning_rate,
        "v": options.rounding_learning_rate,
    }
    optimizer = optax.multi_transform(
        {name: optax.adam(rate) for name, rate in rates.items()},
        {name: name for name in rates},
    )
    warmup = options.iterations // 5

    def loss(theta, x, t, step_key, beta, on):
        error, reg = _segment_loss(
            problem, params, fixed, theta, x, t, step_key, options.drop, rounding_on, beta
        )
        return error + on * rounding_on * options.regularisation * reg

    def step(carry, i):
        theta, state = carry
        batch_key, drop_key = jax.random.split(jax.random.fold_in(key, i))
        index = jax.random.randint(batch_key, (options.batch_size,), 0, inputs_flat.shape[0])
        progress = jnp.clip((i - warmup) / max(options.iterations - warmup, 1), 0.0, 1.0)
        beta = 20.0 + (2.0 - 20.0) * progress
        on = (i >= warmup).astype(jnp.float32)
        grads = jax.grad(loss)(theta, inputs_flat[index], targets_flat[index], drop_key, beta, on)
        updates, state = optimizer.update(grads, state, theta)
        return (optax.apply_updates(theta, updates), state), None

    (theta, _), _ = jax.lax.scan(
        step, (learned, optimizer.init(learned)), jnp.arange(options.iterations)
    )
    return theta


@dataclasses.dataclass(frozen=True)
class QuantisedNetwork:
    """Where post-training quantisation stands when a segment is reconstructed: the flat
    folded parameters with the kernels on their grids (codes times `weight_scales`), the
    float32 kernels they came from (BRECQ learns their rounding afresh), BN statistics and
    the activation ranges."""

    params: dict[str, np.ndarray]
    float_kernels: dict[str, np.ndarray]
    batch_stats: dict
    ranges: dict[str, jax.Array]
    weight_scales: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class SegmentTask:
    """One segment to reconstruct: its kernels' paths, the quantised inputs it reads and
    the float32 outputs it should give, with or without learning its kernels' rounding."""

    segment: Any
    kernels: Sequence[str]
    inputs_q: Sequence[jax.Array]
    targets: Sequence[jax.Array]
    rounding: bool = False
    seed: int = 0


def reconstruct_segment(
    model: nn.Module,
    bits: BitWidths,
    network: QuantisedNetwork,
    task: SegmentTask,
    nest: Callable[[dict], dict],
    options: Reconstruction = Reconstruction(),
) -> tuple[SegmentReport, dict[str, np.ndarray], dict[str, jax.Array]]:
    """Learn the activation grids of the task's segment (and, with `rounding`, its kernels'
    rounding) so that its output on the quantised inputs matches the float32 targets:
    (the report, the parameters, the ranges), changed only where the result improves on
    the starting point."""
    segment, kernels, rounding = task.segment, task.kernels, task.rounding
    params, ranges = dict(network.params), dict(network.ranges)
    weight_scales, float_kernels = network.weight_scales, network.float_kernels
    grids = tuple(
        scale_key(p) for p in kernels if bits.of(p)[1] < INTEGER_BELOW and scale_key(p) in ranges
    )
    integer = tuple(p for p in kernels if bits.of(p)[0] < INTEGER_BELOW)
    problem = _Problem(model, bits, segment.run, integer, grids, nest)
    learned: dict[str, dict] = {"log_step": {}, "zero": {}, "v": {}}
    for key in grids:
        a_bits = bits.of(next(p for p in kernels if scale_key(p) == key))[1]
        step, zero = activation_grid(ranges[key], a_bits, bits.scale_bits)
        learned["log_step"][key] = jnp.log(step)
        learned["zero"][key] = jnp.asarray(zero, jnp.float32)
    fixed: dict[str, Any] = {"batch_stats": network.batch_stats}
    for path in integer:
        scale = jnp.asarray(weight_scales[scale_key(path)], jnp.float32)
        value = jnp.asarray(params[path])
        mask = (value != 0).astype(jnp.float32)
        codes = jnp.round(value / scale)  # the codes chosen layer by layer
        scaled = jnp.asarray(float_kernels[path]) / scale
        floor = jnp.floor(scaled)
        rest = jnp.clip(scaled - floor, 1e-4, 1 - 1e-4)
        learned["v"][path] = -jnp.log((ZETA - GAMMA) / (rest - GAMMA) - 1)
        fixed[path] = (floor, scale, mask, codes)
    others = {k: jnp.asarray(v) for k, v in params.items()}
    x = jnp.stack(list(task.inputs_q))
    t = jnp.stack(list(task.targets))
    on = jnp.float32(1.0 if rounding else 0.0)
    before = float(_evaluate(problem, others, fixed, learned, x, t, jnp.float32(0.0)))
    key = jax.random.PRNGKey(task.seed)
    theta = _learn(problem, options, others, fixed, learned, x, t, key, on)
    after = float(_evaluate(problem, others, fixed, theta, x, t, on))
    kept = after < before
    if kept:
        for key in grids:
            a_bits = bits.of(next(p for p in kernels if scale_key(p) == key))[1]
            step = jnp.exp(theta["log_step"][key])
            ranges[key] = grid_bounds(step, theta["zero"][key], a_bits, bits.scale_bits)
        if rounding:
            for path in integer:
                floor, scale, mask, _ = fixed[path]
                lo, hi = _code_range(problem, path)
                codes = jnp.clip(floor + (theta["v"][path] >= 0), lo, hi) * mask
                params[path] = np.asarray(codes * scale, np.float32)
    report = SegmentReport(segment.name, before, after if kept else before, kept)
    return report, params, ranges
