"""Fake quantisation of MicroNet: integer grids simulated in float32, at any lowering.

- Weights: every conv and dense kernel, symmetric, one scale per output channel (the last
  axis of HWIO and of (in, out)), quantised in the parameter tree. A pruned weight is 0 and
  stays 0 (symmetric grids hold 0 exactly), so pruning masks are kept exactly.
- Activations: the input of every conv and dense layer, one affine grid per tensor (a scale
  and a zero point, 2^b levels over a calibrated range that holds 0 exactly), quantised at
  the module boundary by a flax method interceptor; a depthwise conv's input one grid per
  channel (`BitWidths.depthwise_channels`: its channels' ranges differ by orders of
  magnitude, and integer arithmetic folds a per-channel input scale into the per-channel
  rescale, since each output channel sees one input channel). Most inputs follow a swish
  (≥ −0.28), so a symmetric grid would leave half its levels unused.

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
import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from micronet_jax.models.layers import Conv2d, Dense
from micronet_jax.models.paths import path_name
from micronet_jax.quant.widths import FREEBIE, FULL, INTEGER_BELOW, BitWidths

HISTOGRAM_BINS = 2048


def qmax(bits: int) -> int:
    """Largest magnitude of a symmetric signed grid of `bits` bits: 127 for 8, 7 for 4."""
    return 2 ** (bits - 1) - 1


def round_scale(scale: jax.Array, scale_bits: int = FULL) -> jax.Array:
    """A scale as stored: float16 for `scale_bits` 16 (so evaluation sees what is counted)."""
    if scale_bits >= FULL:
        return scale
    return jnp.asarray(scale).astype(jnp.float16).astype(jnp.float32)


def weight_codes(x: jax.Array, scale: jax.Array, bits: int) -> jax.Array:
    """The integer codes (as floats) of x on the grid scale·{-q..q}."""
    q = qmax(bits)
    scale = jnp.asarray(scale, x.dtype)
    return jnp.round(jnp.clip(x, -q * scale, q * scale) / scale)


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
    y = weight_codes(x, scale, bits) * scale
    return clipped + jax.lax.stop_gradient(y - clipped) if ste else y


def activation_grid(
    bounds: jax.Array, bits: int, scale_bits: int = FULL
) -> tuple[jax.Array, jax.Array]:
    """(step, zero point) of the affine grid of 2^bits levels spanning bounds = (low ≤ 0,
    high ≥ 0): code k stands for (k − zero)·step, so 0 is exact."""
    low, high = jnp.asarray(bounds[0], jnp.float32), jnp.asarray(bounds[1], jnp.float32)
    step = round_scale(jnp.maximum(high - low, 1e-12) / (2**bits - 1), scale_bits)
    return step, jnp.round(-low / step)


def fake_quant_affine(
    x: jax.Array, step: jax.Array, zero: jax.Array, bits: int, ste: bool = False
) -> jax.Array:
    """x on the affine grid (step, zero point) of 2^bits levels; with `ste`, the
    straight-through gradient."""
    step, zero = step.astype(x.dtype), zero.astype(x.dtype)
    clipped = jnp.clip(x, -zero * step, (2**bits - 1 - zero) * step)
    y = jnp.round(clipped / step) * step
    return clipped + jax.lax.stop_gradient(y - clipped) if ste else y


def fake_quant_range(
    x: jax.Array, bounds: jax.Array, bits: int, ste: bool = False, scale_bits: int = FULL
) -> jax.Array:
    """x on the affine grid of 2^bits levels spanning bounds = (low ≤ 0, high ≥ 0), 0 exact
    (a zero point); with `ste`, the straight-through gradient."""
    if bits >= INTEGER_BELOW:
        return fake_quant(x, 1.0, bits, ste)
    step, zero = activation_grid(bounds, bits, scale_bits)
    return fake_quant_affine(x, step, zero, bits, ste)


def channel_scales(kernel: jax.Array, bits: int, scale_bits: int = FULL) -> jax.Array:
    """Per-output-channel scales max|w_c| / q (1 where a channel is all zero)."""
    reduce = tuple(range(kernel.ndim - 1))
    peak = jnp.max(jnp.abs(kernel), axis=reduce)
    return round_scale(jnp.where(peak > 0, peak / qmax(bits), 1.0), scale_bits)


def is_weight(path: str, leaf: Any) -> bool:
    """Conv and dense kernels: the tensors with more than one dimension."""
    return path.endswith("kernel") and np.ndim(leaf) > 1


@dataclasses.dataclass(frozen=True)
class FakeQuant:
    """How a kernel and a layer's input are put on their grids: simulated in float32.

    An exporter subclasses it to emit quantise / dequantise nodes that compute the same; the
    rest of the network is the same `model.apply` either way.
    """

    def weight(self, kernel: jax.Array, scale: jax.Array, bits: int, ste: bool) -> jax.Array:
        return fake_quant(kernel, scale, bits, ste)

    def activation(
        self, x: jax.Array, step: jax.Array, zero: jax.Array, bits: int, ste: bool
    ) -> jax.Array:
        return fake_quant_affine(x, step, zero, bits, ste)


FAKE_QUANT = FakeQuant()


def quantize_weights(
    params: Any,
    bits: BitWidths,
    ste: bool = False,
    scales: dict[str, jax.Array] | None = None,
    ops: FakeQuant = FAKE_QUANT,
) -> Any:
    """Every kernel on its own per-output-channel grid: with the given `scales` ({scale_key:
    per-channel scale}, fixed by post-training quantisation), else scales from the kernel
    itself (max |w| per channel)."""

    def one(key_path, leaf):
        path = path_name(key_path)
        if not is_weight(path, leaf):
            return leaf
        weight_bits, _ = bits.of(path)
        if weight_bits >= INTEGER_BELOW:
            return fake_quant(leaf, 1.0, weight_bits, ste)
        if scales is None:
            scale = jax.lax.stop_gradient(channel_scales(leaf, weight_bits, bits.scale_bits))
        elif scale_key(path) in scales:
            scale = scales[scale_key(path)]
        else:
            raise KeyError(f"no weight scale for {path} ({weight_bits}-bit)")
        return ops.weight(leaf, scale, weight_bits, ste)

    return jax.tree_util.tree_map_with_path(one, params)


def kernel_path(module: nn.Module) -> str:
    """'blocks_3/expand_conv/kernel': the parameter path of a conv or dense module's kernel."""
    return "/".join(module.path) + "/kernel"


def scale_key(path: str) -> str:
    """The activation scale's key for a kernel path: 'blocks_3.expand_conv' (no '/', so the
    scales can sit in a checkpoint's tree)."""
    return path.removesuffix("/kernel").replace("/", ".")


def is_layer_call(context: Any) -> bool:
    """Whether an intercepted call is a conv or dense layer running (the quantised ones)."""
    return context.method_name == "__call__" and isinstance(context.module, Conv2d | Dense)


class LayerInputGrids:
    """Base of the method interceptors that put every conv and dense layer's input on its
    grid: `on_grid(path, x, bits)` where the layer's input width is an integer kernel's, plain
    rounding to `bits` where it is wider, untouched at full width; other calls run as they
    are. Subclasses hold `bits` (a BitWidths) and say how a grid is computed."""

    bits: BitWidths
    ste: bool = False

    def on_grid(self, path: str, x: jax.Array, bits: int) -> jax.Array:
        raise NotImplementedError

    def __call__(self, next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        if not is_layer_call(context):
            return next_fun(*args, **kwargs)
        path = kernel_path(context.module)
        _, activation_bits = self.bits.of(path)
        x = args[0]
        if activation_bits < INTEGER_BELOW:
            x = self.on_grid(path, x, activation_bits)
        elif activation_bits < FULL:
            x = fake_quant(x, 1.0, activation_bits, self.ste)
        return next_fun(x, *args[1:], **kwargs)


@dataclasses.dataclass
class ActivationQuantizer(LayerInputGrids):
    """Method interceptor: the input of every conv and dense layer on its per-tensor grid.

    `ranges` maps `scale_key`s to each layer's calibrated (low, high); layers whose width is
    16 or more need none.
    """

    bits: BitWidths
    ranges: dict[str, jax.Array]
    ste: bool = False
    ops: FakeQuant = FAKE_QUANT

    def on_grid(self, path: str, x: jax.Array, bits: int) -> jax.Array:
        bounds = self.ranges[scale_key(path)]
        with jax.ensure_compile_time_eval():  # constants when the ranges are (export)
            step, zero = activation_grid(bounds, bits, self.bits.scale_bits)
        return self.ops.activation(x, step, zero, bits, self.ste)


@dataclasses.dataclass
class ActivationRecorder:
    """Method interceptor: records a statistic of every conv and dense layer's input."""

    statistic: Callable[[jax.Array], Any]
    found: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __call__(self, next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        if is_layer_call(context):
            x = args[0].astype(jnp.float32)
            self.found[kernel_path(context.module)] = self.statistic(x)
        return next_fun(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class QuantizedApply:
    """`model.apply` with weights and activations on their grids (fake quantisation).

    Called like `model.apply(variables, x, ...)`; the activation ranges ride in
    `variables["quant"]` ({scale_key: (low, high)}) and, when post-training quantisation
    fixed them, the weight scales in `variables["weight_scales"]`, so this is hashable and
    `predict` and the train steps take it as their `apply_fn`.
    """

    model: nn.Module
    bits: BitWidths
    ste: bool = False
    ops: FakeQuant = FAKE_QUANT

    def __call__(self, variables: dict, x: jax.Array, **kwargs: Any) -> Any:
        variables = dict(variables)
        ranges = variables.pop("quant", {})
        scales = variables.pop("weight_scales", None)
        variables["params"] = quantize_weights(
            variables["params"], self.bits, self.ste, scales, self.ops
        )
        with nn.intercept_methods(ActivationQuantizer(self.bits, ranges, self.ste, self.ops)):
            return self.model.apply(variables, x, **kwargs)


# --- calibration --------------------------------------------------------------------------


@dataclasses.dataclass
class Calibration:
    """Per-tensor histograms of the input of every conv and dense layer over calibration
    data, from which each width's range is chosen, and each input's per-channel extremes
    (for the per-channel grids of depthwise inputs)."""

    lows: dict[str, float]
    highs: dict[str, float]
    histograms: dict[str, np.ndarray]  # HISTOGRAM_BINS bins over [low, high]
    channel_lows: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    channel_highs: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def ranges(self, bits: BitWidths, method: str = "mse") -> dict[str, jax.Array]:
        """(low, high) of each layer's input at its width: 'max' spans every value seen,
        'mse' clips where the expected squared error of the grid is least. A depthwise input
        on per-channel grids gets each channel's own (low, high), shape (2, channels), spanning
        what that channel showed (a channel's range is narrow already; clipping it is not
        worth a histogram per channel)."""
        out = {}
        for path, histogram in self.histograms.items():
            _, activation_bits = bits.of(path)
            if activation_bits >= INTEGER_BELOW:
                continue
            if path in self.channel_lows and bits.input_grids(path, 2) > 1:
                low = np.minimum(self.channel_lows[path], 0.0)
                high = np.maximum(self.channel_highs[path], 0.0)
                out[scale_key(path)] = jnp.asarray(np.stack([low, high]), jnp.float32)
                continue
            low, high = self.lows[path], self.highs[path]
            if method == "mse":
                low, high = mse_range(histogram, low, high, activation_bits)
            out[scale_key(path)] = jnp.asarray([low, high], jnp.float32)
        return out


def grid_error(values: np.ndarray, weights: np.ndarray, low: float, high: float, bits: int):
    """Expected squared error of `values` (weighted) on the affine grid over [low, high]."""
    levels = 2**bits - 1
    step = max(high - low, 1e-12) / levels
    zero = np.round(-low / step)
    clipped = np.clip(values, -zero * step, (levels - zero) * step)
    quantized = np.round(clipped / step) * step
    return float(np.sum(weights * ((values - quantized) ** 2)))


def mse_range(histogram: np.ndarray, low: float, high: float, bits: int) -> tuple[float, float]:
    """The clipped range [a·low, b·high] of least expected error (b, then a, searched over
    (0, 1])."""
    edges = np.linspace(low, high, len(histogram) + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    weights = histogram / max(histogram.sum(), 1)
    shrink = np.linspace(0.02, 1.0, 50)
    best_b = min(shrink, key=lambda b: grid_error(centres, weights, low, high * b, bits))
    best_a = min(shrink, key=lambda a: grid_error(centres, weights, low * a, high * best_b, bits))
    return float(low * best_a), float(high * best_b)


def calibrate(
    model: nn.Module, variables: dict, batches: Iterable[np.ndarray], prepare: Callable
) -> Calibration:
    """Histograms of each layer's input over `batches` (uint8 images, `prepare`d into the
    model's input): a pass for the range (always holding 0), then one for histograms."""
    batches = list(batches)

    def recorded(statistic, v, b):
        recorder = ActivationRecorder(statistic)
        with nn.intercept_methods(recorder):
            model.apply(v, prepare(b), train=False)
        return recorder.found

    def per_channel(x):
        axes = tuple(range(x.ndim - 1))
        return jnp.min(x, axis=axes), jnp.max(x, axis=axes)

    extremes = jax.jit(functools.partial(recorded, per_channel))
    channel_lows: dict[str, np.ndarray] = {}
    channel_highs: dict[str, np.ndarray] = {}
    for batch in batches:
        for key, (low, high) in extremes(variables, batch).items():
            low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
            channel_lows[key] = np.minimum(channel_lows.get(key, low), low)
            channel_highs[key] = np.maximum(channel_highs.get(key, high), high)
    lows = {k: min(0.0, float(v.min())) for k, v in channel_lows.items()}
    highs = {k: max(0.0, float(v.max())) for k, v in channel_highs.items()}
    bounds = {k: (jnp.float32(lows[k]), jnp.float32(max(highs[k] - lows[k], 1e-12))) for k in lows}

    def histograms_of(v, b):
        found = recorded(lambda x: x, v, b)
        out = {}
        for key, x in found.items():
            low, width = bounds[key]
            index = jnp.clip(
                ((x - low) / width * HISTOGRAM_BINS).astype(jnp.int32), 0, HISTOGRAM_BINS - 1
            )
            out[key] = jnp.zeros(HISTOGRAM_BINS, jnp.int32).at[index.ravel()].add(1)
        return out

    histograms_jit = jax.jit(histograms_of)
    histograms = {key: np.zeros(HISTOGRAM_BINS, np.int64) for key in lows}
    for batch in batches:
        for key, value in histograms_jit(variables, batch).items():
            histograms[key] += np.asarray(value)
    return Calibration(lows, highs, histograms, channel_lows, channel_highs)


__all__ = [
    "FREEBIE",
    "ActivationQuantizer",
    "Calibration",
    "calibrate",
    "channel_scales",
    "fake_quant",
    "fake_quant_range",
    "QuantizedApply",
    "quantize_weights",
]
