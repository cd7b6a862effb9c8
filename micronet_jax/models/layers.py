"""Building blocks with the original's exact semantics: conv, ghost BN, squeeze-excite.

Initialisation follows PyTorch's defaults (weights and biases U(±1/√fan_in)), because the
recipe was tuned with them.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from micronet_jax.models.conv import conv2d

Dtype = Any


def torch_uniform(fan_in: int):
    """PyTorch's default init for conv/linear weights and biases: U(±1/√fan_in)."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


@jax.custom_vjp
def swish(x: jax.Array) -> jax.Array:
    """x·σ(x). The backward keeps only x and recomputes σ (the original's memory-efficient
    swish): autodiff would keep σ(x) too, an extra activation-sized buffer per layer."""
    return x * jax.nn.sigmoid(x)


def _swish_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return swish(x), x


def _swish_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    s = jax.nn.sigmoid(x)
    return (g * (s * (1 + x * (1 - s))),)


swish.defvjp(_swish_fwd, _swish_bwd)


_GHOST_AXES = (0, 2, 3)  # of a (N/s, s, H, W, C) grouped batch: all but ghost batch and channel


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def ghost_normalize(
    g: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per ghost batch (axis 1) normalise by mean and biased variance, then scale and shift.

    Returns (y, mean, var); mean and var only feed the running statistics (no gradient).
    The hand-written backward is the textbook BN gradient: it keeps the input and two
    per-channel vectors instead of autodiff's chain of intermediates, and makes two passes.
    """
    y, mean, var, _ = _ghost_forward(g, scale, bias, epsilon)
    return y, mean, var


def _ghost_forward(g, scale, bias, epsilon):
    mean = jnp.mean(g, axis=_GHOST_AXES, keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=_GHOST_AXES, keepdims=True)
    inv = jax.lax.rsqrt(var + epsilon)
    a = inv * scale
    return g * a + (bias - mean * a), mean, var, inv


def _ghost_fwd(g, scale, bias, epsilon):
    y, mean, var, inv = _ghost_forward(g, scale, bias, epsilon)
    return (y, mean, var), (g, mean, inv, scale)


def _ghost_bwd(epsilon, residuals, cotangents):
    del epsilon
    g, mean, inv, scale = residuals
    dy = cotangents[0]
    count = g.size // (g.shape[1] * g.shape[-1])
    xhat = (g - mean) * inv
    sum_dy = jnp.sum(dy, axis=_GHOST_AXES, keepdims=True)
    sum_dy_xhat = jnp.sum(dy * xhat, axis=_GHOST_AXES, keepdims=True)
    # dg = k·(dy − (Σdy + x̂·Σdy·x̂)/count), k = scale·inv, expanded so that every coefficient
    # is a per-(ghost batch, channel) vector: a full-size constant would be materialised.
    k = scale * inv
    slope = -k * inv * sum_dy_xhat / count
    offset = -k * sum_dy / count - slope * mean
    dg = k * dy + slope * g + offset
    reduce = tuple(range(g.ndim - 1))
    dscale = jnp.sum(sum_dy_xhat, axis=reduce)
    dbias = jnp.sum(sum_dy, axis=reduce)
    return dg, dscale, dbias


ghost_normalize.defvjp(_ghost_fwd, _ghost_bwd)


class Conv2d(nn.Module):
    """A conv with explicit (before, after) padding and an HWIO `kernel` (+ optional `bias`)."""

    features: int
    kernel_size: int = 1
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    groups: int = 1
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cin = x.shape[-1]
        k = self.kernel_size
        fan_in = (cin // self.groups) * k * k
        kernel = self.param(
            "kernel", torch_uniform(fan_in), (k, k, cin // self.groups, self.features)
        )
        y = conv2d(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            self.stride,
            self.padding,
            self.groups,
            self.impl,
        )
        if self.use_bias:
            bias = self.param("bias", torch_uniform(fan_in), (self.features,))
            y = y + bias.astype(self.dtype)
        return y


class Dense(nn.Module):
    """A linear layer with PyTorch's default initialisation."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        kernel = self.param("kernel", torch_uniform(fan_in), (fan_in, self.features))
        bias = self.param("bias", torch_uniform(fan_in), (self.features,))
        y = x.astype(self.dtype) @ kernel.astype(self.dtype)
        return y + bias.astype(self.dtype)


class GhostBatchNorm(nn.Module):
    """Batch norm over `splits` interleaved ghost batches (sample n is in ghost batch n mod s).

    Training normalises each ghost batch by its own mean and biased variance; the running
    statistics move towards the mean over ghost batches of their means and of their
    *unbiased* variances. Evaluation uses the running statistics. Statistics stay float32.
    """

    splits: int = 4
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if not train:
            inv = jax.lax.rsqrt(ra_var.value + self.epsilon) * scale
            return (x.astype(jnp.float32) * inv + (bias - ra_mean.value * inv)).astype(self.dtype)

        n = x.shape[0]
        if n % self.splits:
            raise ValueError(f"batch size {n} is not divisible by the {self.splits} ghost batches")
        grouped = x.astype(jnp.float32).reshape(n // self.splits, self.splits, *x.shape[1:])
        if grouped.ndim != 5:
            grouped = grouped.reshape(grouped.shape[:2] + (1,) * (5 - grouped.ndim) + (c,))
        y, mean, var = ghost_normalize(grouped, scale, bias, self.epsilon)
        if not self.is_initializing():
            count = grouped.size // (self.splits * c)
            batch_mean = jnp.mean(mean.reshape(self.splits, c), axis=0)
            batch_var = jnp.mean(var.reshape(self.splits, c), axis=0) * count / max(count - 1, 1)
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(batch_mean)
            ra_var.value = m * ra_var.value + (1 - m) * jax.lax.stop_gradient(batch_var)
        return y.reshape(x.shape).astype(self.dtype)


def squeeze_excite(
    x: jax.Array, reduced: int, dtype: Dtype = jnp.float32, impl: str = "auto"
) -> jax.Array:
    """Global pool -> 1x1 conv (bias) -> swish -> 1x1 conv (bias) -> sigmoid -> scale.

    Call inside a compact module: the two convs become its `se_reduce` / `se_expand`.
    """
    pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
    common = dict(use_bias=True, dtype=dtype, impl=impl)
    s = Conv2d(reduced, name="se_reduce", **common)(pooled)
    s = Conv2d(x.shape[-1], name="se_expand", **common)(swish(s))
    return x * jax.nn.sigmoid(s)


def drop_connect(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Per-sample stochastic depth: keep with probability 1 - rate, rescale by 1/(1 - rate)."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


UPSAMPLES = ("gather", "repeat")


def upsample_nearest(x: jax.Array, size: int, how: str = "gather") -> jax.Array:
    """Nearest upsampling as PyTorch does it: output i reads input floor(i * in / out).

    `how` 'gather' reads those rows and columns; 'repeat' concatenates each row and column k
    times and crops (the same values wherever floor(i * in / out) = i // k, as for 32 -> 63),
    which keeps the batch on the first axis of every reshape and out of every shape a
    converter bakes in: what LiteRT needs to change a model's batch size after conversion."""
    if how not in UPSAMPLES:
        raise ValueError(f"upsample must be one of {UPSAMPLES}, got {how!r}")
    n, src, _, channels = x.shape
    if size == src:
        return x
    rows = (np.arange(size) * src) // size
    k = -(-size // src)
    if how == "gather" or not np.array_equal(rows, np.arange(size) // k):
        return x[:, rows][:, :, rows]
    tall = jnp.concatenate([x[:, :, None]] * k, axis=2).reshape(n, src * k, src, channels)
    wide = jnp.concatenate([tall[:, :, :, None]] * k, axis=3)
    wide = wide.reshape(n, src * k, src * k, channels)
    return jax.lax.slice(wide, (0, 0, 0, 0), (n, size, size, channels))
