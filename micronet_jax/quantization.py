"""Fake quantisation of MicroNet: integer grids simulated in float32, at any lowering.

- Weights: every conv and dense kernel, symmetric, one scale per output channel (the last
  axis of HWIO and of (in, out)), quantised in the parameter tree. A pruned weight is 0 and
  stays 0 (symmetric grids hold 0 exactly), so pruning masks are kept exactly.
- Activations: the input of every conv and dense layer, symmetric, one scale per tensor,
  quantised at the module boundary by a flax method interceptor.

Why not qwix: qwix intercepts `lax.conv_general_dilated` and `dot_general`. On a CPU this
network's convolutions are lowered as shifted multiply-adds and matmuls (models/conv.py),
which qwix cannot see, and a quantised model must compute the same on every backend. So
weights are quantised in the tree and activations at module boundaries here, which is the
same arithmetic whatever the lowering (qwix's weight quantisation is the cross-check in
tests/test_quantization.py).

Widths of 16 and more are not integer grids: 16 rounds to float16, 32 leaves the value as is.
`ste=True` gives the straight-through gradient of quantisation-aware training: the identity
inside the grid's range, zero outside it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from micronet_jax.bitwidths import FREEBIE, FULL, INTEGER_BELOW, BitWidths
from micronet_jax.models.layers import Conv2d, Dense
from micronet_jax.pruning import path_name

HISTOGRAM_BINS = 2048


def qmax(bits: int) -> int:
    """Largest magnitude of a symmetric signed grid of `bits` bits: 127 for 8, 7 for 4."""
    return 2 ** (bits - 1) - 1


def fake_quant(x: jax.Array, scale: jax.Array, bits: int, ste: bool = False) -> jax.Array:
    """x rounded to the grid scale·{-q..q}; with `ste`, the straight-through gradient."""
    if bits >= FULL:
        return x
    if bits >= INTEGER_BELOW:  # float16: exactly representable in fp32, no scale
        y = x.astype(jnp.float16).astype(x.dtype)
        return x + jax.lax.stop_gradient(y - x) if ste else y
    q = qmax(bits)
    scale = jnp.asarray(scale, x.dtype)
    clipped = jnp.clip(x, -q * scale, q * scale)
    y = jnp.round(clipped / scale) * scale
    return clipped + jax.lax.stop_gradient(y - clipped) if ste else y


def channel_scales(kernel: jax.Array, bits: int) -> jax.Array:
    """Per-output-channel scales max|w_c| / q (1 where a channel is all zero)."""
    reduce = tuple(range(kernel.ndim - 1))
    peak = jnp.max(jnp.abs(kernel), axis=reduce)
    return jnp.where(peak > 0, peak / qmax(bits), 1.0)


def is_weight(path: str, leaf: Any) -> bool:
    """Conv and dense kernels: the tensors with more than one dimension."""
    return path.endswith("kernel") and np.ndim(leaf) > 1


def quantize_weights(params: Any, bits: BitWidths, ste: bool = False) -> Any:
    """Every kernel on its own per-output-channel grid (scales from the kernel itself)."""

    def one(key_path, leaf):
        path = path_name(key_path)
        if not is_weight(path, leaf):
            return leaf
        weight_bits, _ = bits.of(path)
        if weight_bits >= INTEGER_BELOW:
            return fake_quant(leaf, 1.0, weight_bits, ste)
        scale = jax.lax.stop_gradient(channel_scales(leaf, weight_bits))
        return fake_quant(leaf, scale, weight_bits, ste)

    return jax.tree_util.tree_map_with_path(one, params)


def kernel_path(module: nn.Module) -> str:
    """'blocks_3/expand_conv/kernel': the parameter path of a conv or dense module's kernel."""
    return "/".join(module.path) + "/kernel"


def scale_key(path: str) -> str:
    """The activation scale's key for a kernel path: 'blocks_3.expand_conv' (no '/', so the
    scales can sit in a checkpoint's tree)."""
    return path.removesuffix("/kernel").replace("/", ".")


def _intercepts(context: Any) -> bool:
    return context.method_name == "__call__" and isinstance(context.module, Conv2d | Dense)


@dataclasses.dataclass
class ActivationQuantizer:
    """Method interceptor: the input of every conv and dense layer on its per-tensor grid.

    `scales` maps `scale_key`s to each layer's input scale; layers whose width is 16 or more
    need none.
    """

    bits: BitWidths
    scales: dict[str, jax.Array]
    ste: bool = False

    def __call__(self, next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        if not _intercepts(context):
            return next_fun(*args, **kwargs)
        path = kernel_path(context.module)
        _, activation_bits = self.bits.of(path)
        x = args[0]
        if activation_bits < FULL:
            scale = self.scales[scale_key(path)] if activation_bits < INTEGER_BELOW else 1.0
            x = fake_quant(x, scale, activation_bits, self.ste)
        return next_fun(x, *args[1:], **kwargs)


@dataclasses.dataclass
class ActivationRecorder:
    """Method interceptor: records a statistic of every conv and dense layer's input."""

    statistic: Callable[[jax.Array], jax.Array]
    found: dict[str, jax.Array] = dataclasses.field(default_factory=dict)

    def __call__(self, next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        if _intercepts(context):
            self.found[kernel_path(context.module)] = self.statistic(
                jnp.abs(args[0].astype(jnp.float32))
            )
        return next_fun(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class QuantizedApply:
    """`model.apply` with weights and activations on their grids (fake quantisation).

    Called like `model.apply(variables, x, ...)`; the activation scales ride in
    `variables["quant"]` ({scale_key: scale}), so this is hashable and `predict` and the
    train steps take it as their `apply_fn`.
    """

    model: nn.Module
    bits: BitWidths
    ste: bool = False

    def __call__(self, variables: dict, x: jax.Array, **kwargs: Any) -> Any:
        variables = dict(variables)
        scales = variables.pop("quant", {})
        variables["params"] = quantize_weights(variables["params"], self.bits, self.ste)
        with nn.intercept_methods(ActivationQuantizer(self.bits, scales, self.ste)):
            return self.model.apply(variables, x, **kwargs)


# --- calibration --------------------------------------------------------------------------


def _recorded(model: nn.Module, variables: dict, x: jax.Array, statistic) -> dict[str, jax.Array]:
    recorder = ActivationRecorder(statistic)
    with nn.intercept_methods(recorder):
        model.apply(variables, x, train=False)
    return recorder.found


@dataclasses.dataclass
class Calibration:
    """Per-tensor histograms of |input| of every conv and dense layer over calibration data,
    from which each width's scale is chosen."""

    peaks: dict[str, float]
    histograms: dict[str, np.ndarray]

    def scales(self, bits: BitWidths, method: str = "mse") -> dict[str, jax.Array]:
        """The scale of each layer's input at its width: 'max' spans the largest value seen,
        'mse' picks the clipping range that minimises the expected squared error."""
        out = {}
        for path, peak in self.peaks.items():
            _, activation_bits = bits.of(path)
            if activation_bits >= INTEGER_BELOW:
                continue
            histogram = self.histograms[path]
            clip = peak if method == "max" else mse_clip(histogram, peak, activation_bits)
            out[scale_key(path)] = jnp.float32(max(clip, 1e-12) / qmax(activation_bits))
        return out


def mse_clip(histogram: np.ndarray, peak: float, bits: int) -> float:
    """The clipping value c in (0, peak] minimising the expected error of quantising |x|
    (distributed as `histogram` over [0, peak]) on the grid c/q·{0..q}."""
    centres = (np.arange(len(histogram)) + 0.5) * peak / len(histogram)
    weights = histogram / max(histogram.sum(), 1)
    best, best_error = peak, np.inf
    for clip in peak * np.linspace(0.05, 1.0, 96):
        step = clip / qmax(bits)
        inside = np.minimum(centres, clip)
        error = np.sum(
            weights * ((inside - np.round(inside / step) * step) ** 2 + (centres - inside) ** 2)
        )
        if error < best_error:
            best, best_error = clip, error
    return float(best)


def calibrate(
    model: nn.Module, variables: dict, batches: Iterable[np.ndarray], prepare: Callable
) -> Calibration:
    """Histograms of each layer's |input| over `batches` (uint8 images, `prepare`d into the
    model's input): a pass for the peaks, then one for histograms over [0, peak]."""
    batches = list(batches)
    peaks_of = jax.jit(lambda v, b: _recorded(model, v, prepare(b), jnp.max))
    peaks: dict[str, float] = {}
    for batch in batches:
        for key, value in peaks_of(variables, batch).items():
            peaks[key] = max(peaks.get(key, 0.0), float(value))
    edges = {key: jnp.float32(max(peak, 1e-12)) for key, peak in peaks.items()}

    def histogram_of(v, b):
        found = {}
        recorder = ActivationRecorder(lambda a: a)  # the raw |x|, binned below
        with nn.intercept_methods(recorder):
            model.apply(v, prepare(b), train=False)
        for key, values in recorder.found.items():
            index = jnp.clip(
                (values / edges[key] * HISTOGRAM_BINS).astype(jnp.int32), 0, HISTOGRAM_BINS - 1
            )
            found[key] = jnp.zeros(HISTOGRAM_BINS, jnp.int32).at[index.ravel()].add(1)
        return found

    histogram_jit = jax.jit(histogram_of)
    histograms = {key: np.zeros(HISTOGRAM_BINS, np.int64) for key in peaks}
    for batch in batches:
        for key, value in histogram_jit(variables, batch).items():
            histograms[key] += np.asarray(value)
    return Calibration(peaks, histograms)


def count_scales(params: Any, bits: BitWidths, activation_keys: Iterable[str]) -> int:
    """Scales an entry stores: one per output channel of each integer-quantised kernel and
    one per integer-quantised activation tensor."""
    total = 0
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(params):
        path = path_name(key_path)
        if is_weight(path, leaf) and bits.of(path)[0] < INTEGER_BELOW:
            total += int(np.shape(leaf)[-1])
    return total + sum(1 for path in activation_keys if bits.of(path)[1] < INTEGER_BELOW)


__all__ = [
    "FREEBIE",
    "ActivationQuantizer",
    "Calibration",
    "calibrate",
    "channel_scales",
    "fake_quant",
    "QuantizedApply",
    "quantize_weights",
]
