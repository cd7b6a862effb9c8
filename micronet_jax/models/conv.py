"""Convolution lowerings: the same math, written the way each backend runs fastest.

XLA on CPU runs `lax.conv_general_dilated` slowly for this network's shapes (depthwise convs
especially; see DESIGN.md). On CPU a depthwise conv is faster as k² shifted multiply-adds, a
1x1 conv as a matmul, and the stem as im2col + matmul. GPUs and TPUs prefer the native conv.
Every form takes an HWIO kernel, so parameters never depend on the lowering.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

ConvImpl = Literal["auto", "xla", "fast"]
CONV_IMPLS = ("auto", "xla", "fast")


def resolve_impl(impl: str) -> str:
    """'auto' picks the shifted/matmul forms on CPU and XLA's native conv elsewhere."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "fast" if jax.default_backend() == "cpu" else "xla"
    return impl


def _pad(x: jax.Array, padding: tuple[int, int]) -> jax.Array:
    if padding == (0, 0):
        return x
    return jnp.pad(x, ((0, 0), padding, padding, (0, 0)))


def _output_size(size: int, kernel: int, stride: int, padding: tuple[int, int]) -> int:
    return (size + padding[0] + padding[1] - kernel) // stride + 1


def _shifted_windows(x: jax.Array, kernel: int, stride: int, padding: tuple[int, int]):
    """Yield ((i, j), strided view) for every kernel tap of a padded NHWC input."""
    xp = _pad(x, padding)
    n, _, _, c = x.shape
    ho = _output_size(x.shape[1], kernel, stride, padding)
    wo = _output_size(x.shape[2], kernel, stride, padding)
    for i in range(kernel):
        for j in range(kernel):
            view = lax.slice(
                xp,
                (0, i, j, 0),
                (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
                (1, stride, stride, 1),
            )
            yield (i, j), view


def conv_xla(
    x: jax.Array, kernel: jax.Array, stride: int, padding: tuple[int, int], groups: int = 1
) -> jax.Array:
    """XLA's native convolution (NHWC, HWIO)."""
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=(padding, padding),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


def pointwise_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A 1x1 stride-1 conv as a matmul over the channel axis."""
    return jnp.einsum("nhwc,cd->nhwd", x, kernel[0, 0])


def depthwise_shifted(
    x: jax.Array, kernel: jax.Array, stride: int, padding: tuple[int, int]
) -> jax.Array:
    """A depthwise conv as k² shifted, strided multiply-adds."""
    k = kernel.shape[0]
    out = None
    for (i, j), view in _shifted_windows(x, k, stride, padding):
        term = view * kernel[i, j, 0]
        out = term if out is None else out + term
    return out


def conv_im2col(
    x: jax.Array, kernel: jax.Array, stride: int, padding: tuple[int, int]
) -> jax.Array:
    """A dense conv as patch extraction + one matmul (for the stem's 3 input channels)."""
    k, _, cin, cout = kernel.shape
    patches = jnp.concatenate([view for _, view in _shifted_windows(x, k, stride, padding)], -1)
    return jnp.einsum("nhwp,pd->nhwd", patches, kernel.reshape(k * k * cin, cout))


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    stride: int = 1,
    padding: tuple[int, int] = (0, 0),
    groups: int = 1,
    impl: str = "auto",
) -> jax.Array:
    """Convolve NHWC `x` with HWIO `kernel` using the lowering `impl` selects."""
    impl = resolve_impl(impl)
    k = kernel.shape[0]
    if impl == "xla":
        return conv_xla(x, kernel, stride, padding, groups)
    if k == 1 and stride == 1 and padding == (0, 0) and groups == 1:
        return pointwise_matmul(x, kernel)
    if groups == x.shape[-1] and kernel.shape[2] == 1 and kernel.shape[3] == groups:
        return depthwise_shifted(x, kernel, stride, padding)
    if groups == 1:
        return conv_im2col(x, kernel, stride, padding)
    return conv_xla(x, kernel, stride, padding, groups)
