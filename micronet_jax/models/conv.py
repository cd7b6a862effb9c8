"""Convolution lowerings: the same math, written the way each backend runs fastest.

XLA on CPU runs `lax.conv_general_dilated` slowly for this network's shapes (measured on two
cores, batch 128: a depthwise 3×3 on 31×31×96, forward and backward, takes 1,148 ms as XLA's
grouped conv and 194 ms as nine shifted multiply-adds). On CPU a depthwise conv is faster as k²
shifted multiply-adds, a 1x1 conv as a matmul, and the stem as im2col + matmul. GPUs and TPUs
prefer the native conv. Every form takes an HWIO kernel, so parameters never depend on the
lowering.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from micronet_jax.backend import on_cpu

CONV_IMPLS = ("auto", "xla", "fast")


def resolve_impl(impl: str) -> str:
    """'auto' picks the shifted/matmul forms on CPU and XLA's native conv elsewhere."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "fast" if on_cpu() else "xla"
    return impl


def _pad(x: jax.Array, padding: tuple[int, int]) -> jax.Array:
    if padding == (0, 0):
        return x
    return jnp.pad(x, ((0, 0), padding, padding, (0, 0)))


def _output_size(size: int, kernel: int, stride: int, padding: tuple[int, int]) -> int:
    return (size + padding[0] + padding[1] - kernel) // stride + 1


def shifted_windows(x: jax.Array, kernel: int, stride: int, padding: tuple[int, int]):
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


@jax.custom_vjp
def pointwise_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A 1x1 stride-1 conv as a matmul over the channel axis."""
    return jnp.einsum("nhwc,cd->nhwd", x, kernel[0, 0])


def _pointwise_fwd(x, kernel):
    return pointwise_matmul(x, kernel), (x, kernel)


def _pointwise_bwd(residuals, dy):
    """The kernel gradient contracts over every position; the operand that has to be laid
    out position-minor for the matmul is transposed explicitly, choosing the narrower one
    (XLA's own choice transposes the wider)."""
    x, kernel = residuals
    cin, cout = x.shape[-1], dy.shape[-1]
    x2, dy2 = x.reshape(-1, cin), dy.reshape(-1, cout)
    if cin <= cout:
        dw = jnp.transpose(x2) @ dy2
    else:
        dw = jnp.transpose(jnp.transpose(dy2) @ x2)
    dx = jnp.einsum("nhwd,cd->nhwc", dy, kernel[0, 0])
    return dx, dw.reshape(kernel.shape).astype(kernel.dtype)


pointwise_matmul.defvjp(_pointwise_fwd, _pointwise_bwd)


def depthwise_sum(
    x: jax.Array, kernel: jax.Array, stride: int, padding: tuple[int, int]
) -> jax.Array:
    """A depthwise conv as k² shifted, strided 2-D windows of `x`, each times its tap: the
    form training differentiates."""
    k = kernel.shape[0]
    out = None
    for (i, j), view in shifted_windows(x, k, stride, padding):
        term = view * kernel[i, j, 0]
        out = term if out is None else out + term
    return out


def depthwise_sum_flat(
    x: jax.Array, kernel: jax.Array, stride: int, padding: tuple[int, int]
) -> jax.Array:
    """`depthwise_sum` (bit for bit) with every stride-1 tap read from the padded input.

    Each tap is a window of the row-flattened padded input, so the output grid carries the
    padded width and its extra columns are dropped at the end. In `depthwise_sum` the centre
    tap is exactly the unpadded input, which XLA then reads directly: the input's producer
    (BN + swish) gains a second consumer and is split into extra passes over the activation.
    """
    if stride != 1:
        return depthwise_sum(x, kernel, stride, padding)
    k = kernel.shape[0]
    n, h, w, c = x.shape
    before, after = padding
    xp = jnp.pad(x, ((0, 0), (before, after + 1), (before, after), (0, 0)))  # +1 row: last tap
    wp = xp.shape[2]
    ho, wo = _output_size(h, k, 1, padding), _output_size(w, k, 1, padding)
    flat = xp.reshape(n, -1, c)
    out = None
    for i in range(k):
        for j in range(k):
            start = i * wp + j
            term = lax.slice(flat, (0, start, 0), (n, start + ho * wp, c)) * kernel[i, j, 0]
            out = term if out is None else out + term
    return out.reshape(n, ho, wp, c)[:, :, :wo]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_shifted(
    x: jax.Array, kernel: jax.Array, stride: int, padding: tuple[int, int]
) -> jax.Array:
    """A depthwise conv as k² shifted, strided multiply-adds.

    The backward keeps only `x`. Under plain autodiff XLA writes out all k² shifted views of
    `x` to feed the kernel-gradient reductions: k² activation-sized buffers per layer and
    most of the layer's backward time on a memory-bound CPU. Without differentiation
    (inference) the forward is `depthwise_sum_flat`, which fuses better there.
    """
    return depthwise_sum_flat(x, kernel, stride, padding)


def _depthwise_fwd(x, kernel, stride, padding):
    return depthwise_sum(x, kernel, stride, padding), (x, kernel)


def _depthwise_bwd(stride, padding, residuals, dy):
    x, kernel = residuals
    _, pullback = jax.vjp(lambda a: depthwise_sum(a, kernel, stride, padding), x)
    (dx,) = pullback(dy)
    return dx, depthwise_kernel_grad(x, dy, kernel.shape[0], stride, padding).astype(kernel.dtype)


depthwise_shifted.defvjp(_depthwise_fwd, _depthwise_bwd)


CHUNK_BYTES = 2 << 20  # a chunk of samples that stays in cache while its k² taps are summed


def depthwise_kernel_grad(
    x: jax.Array,
    dy: jax.Array,
    kernel_size: int,
    stride: int,
    padding: tuple[int, int],
    chunk_bytes: int = CHUNK_BYTES,
) -> jax.Array:
    """d(loss)/d(kernel) of a depthwise conv: Σ over samples and positions of view_ij · dy.

    A scan over chunks of the batch of at most `chunk_bytes` (cache-sized) pads each chunk
    and reduces its k² shifted products there, so every activation is read from memory once
    (float32 accumulation).
    """
    n, c = x.shape[0], x.shape[-1]
    per_sample = x[0].size * x.dtype.itemsize
    chunk = max(
        d for d in range(1, n + 1) if n % d == 0 and d * per_sample <= max(chunk_bytes, per_sample)
    )
    xs = x.reshape(n // chunk, chunk, *x.shape[1:])
    dys = dy.reshape(n // chunk, chunk, *dy.shape[1:])

    def accumulate(total, pair):
        xb, dyb = pair
        taps = [
            jnp.sum(view * dyb, axis=(0, 1, 2), dtype=jnp.float32)
            for _, view in shifted_windows(xb, kernel_size, stride, padding)
        ]
        return total + jnp.stack(taps), None

    total, _ = lax.scan(accumulate, jnp.zeros((kernel_size**2, c), jnp.float32), (xs, dys))
    return total.reshape(kernel_size, kernel_size, 1, c)


def conv_im2col(
    x: jax.Array, kernel: jax.Array, stride: int, padding: tuple[int, int]
) -> jax.Array:
    """A dense conv as patch extraction + one matmul (for the stem's 3 input channels)."""
    k, _, cin, cout = kernel.shape
    patches = jnp.concatenate([view for _, view in shifted_windows(x, k, stride, padding)], -1)
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
