"""Building blocks with the original's exact semantics: conv, ghost BN, squeeze-excite.

Initialisation follows PyTorch's defaults (weights and biases U(±1/√fan_in)), because the
recipe was tuned with them.
"""

from __future__ import annotations

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


def swish(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(x)


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
        axes = tuple(i for i in range(grouped.ndim - 1) if i != 1)
        mean = jnp.mean(grouped, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(grouped - mean), axis=axes, keepdims=True)
        inv = jax.lax.rsqrt(var + self.epsilon) * scale
        y = grouped * inv + (bias - mean * inv)
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


def upsample_nearest(x: jax.Array, size: int) -> jax.Array:
    """Nearest upsampling as PyTorch does it: output i reads input floor(i * in / out)."""
    src = x.shape[1]
    if size == src:
        return x
    rows = (np.arange(size) * src) // size
    return x[:, rows][:, :, rows]
