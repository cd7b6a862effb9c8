"""Post-training quantisation: the grids and roundings a deployed integer network uses.

BN is folded into the convs first (the deployed form), then every kernel is put on its
per-output-channel grid, layer by layer in the order the network runs them. Each step is a
switch of `Method`:

- weight clipping: `max` (scale = max|w| / q) or `mse` (per output channel, the clip of least
  squared rounding error);
- rounding: `nearest`, or `adaround` (AdaRound, Nagel et al. 2020): each weight rounded up
  or down as learned on calibration images, minimising the layer's output error;
- bias correction (Nagel et al. 2019, with calibration images): the mean shift the rounding
  leaves in each output channel is taken off the bias that follows (the folded BN's).

The data-driven steps see each layer as the deployed network does: its input comes from the
already-quantised layers before it, with activations on their grids, and its target is the
float32 network's output (AdaRound's "asymmetric" reconstruction), so a layer also corrects
some of the error that reaches it. A layer's output error is a quadratic form in its weights,
so one pass over the calibration images per layer gathers it whole (the input's second
moments: (k²·c_in)² numbers for a conv, k⁴ per channel for a depthwise conv) and the
rounding is then learned on those moments, not on the images: seconds per layer on a CPU.

The result is a variables dict for `QuantizedApply`: folded `params` with every integer
kernel on its grid, `weight_scales` (fixed per-channel scales) and `quant` (activation
ranges). Pruned weights stay exactly zero.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from micronet_jax.errors import ConfigError
from micronet_jax.models.conv import shifted_windows
from micronet_jax.models.efficientnet import segments
from micronet_jax.models.fold import bias_after, fold_batch_norm
from micronet_jax.models.layers import Conv2d
from micronet_jax.models.paths import path_name
from micronet_jax.quant.fake import (
    ActivationQuantizer,
    Calibration,
    calibrate,
    channel_scales,
    fake_quant,
    is_layer_call,
    kernel_path,
    qmax,
    round_scale,
    scale_key,
)
from micronet_jax.quant.reconstruct import (
    QuantisedNetwork,
    Reconstruction,
    SegmentTask,
    reconstruct_segment,
)
from micronet_jax.quant.widths import FULL, INTEGER_BELOW, BitWidths, is_depthwise

CLIPS = ("max", "mse")
DEPTHWISE_POSITIONS = 8192  # per batch, for a depthwise conv's per-channel moments
ROUNDINGS = ("nearest", "adaround", "brecq")
QDROP = 0.5  # QDrop's probability of leaving an activation unquantised while learning


@dataclasses.dataclass(frozen=True)
class Method:
    """One post-training quantisation recipe."""

    weight_clip: str = "max"
    rounding: str = "nearest"
    bias_correction: bool = False
    activation_clip: str = "mse"  # how activation ranges are chosen from their histograms
    learned_grids: bool = False  # activation steps and zero points learned per segment (LSQ)
    qdrop: bool = False  # activations dropped from quantisation while learning (QDrop)

    def __post_init__(self) -> None:
        if self.weight_clip not in CLIPS or self.activation_clip not in CLIPS:
            raise ConfigError(f"clipping must be one of {CLIPS}")
        if self.rounding not in ROUNDINGS:
            raise ConfigError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.qdrop and not self.reconstructs:
            raise ConfigError("qdrop drops activations while a segment learns: add lsq or brecq")

    @property
    def per_layer(self) -> bool:
        """Whether layers are visited with calibration images (AdaRound, bias correction)."""
        return self.rounding == "adaround" or self.bias_correction

    @property
    def reconstructs(self) -> bool:
        """Whether each segment is reconstructed (`reconstruct`: BRECQ, LSQ steps)."""
        return self.rounding == "brecq" or self.learned_grids

    @property
    def needs_data(self) -> bool:
        """Whether calibration images flow through the network beyond activation ranges."""
        return self.per_layer or self.reconstructs

    @property
    def name(self) -> str:
        parts = ["mse"] if self.weight_clip == "mse" else []
        parts += [self.rounding] if self.rounding != "nearest" else []
        parts += ["bias"] if self.bias_correction else []
        parts += ["lsq"] if self.learned_grids else []
        parts += ["qdrop"] if self.qdrop else []
        return "+".join(parts) or "nearest"


METHOD_PARTS = ("nearest", "mse", "adaround", "brecq", "bias", "lsq", "qdrop")


def parse_method(text: str) -> Method:
    """'nearest', or '+'-joined parts: 'mse' (weight clipping), 'adaround' (rounding learned
    layer by layer) or 'brecq' (learned block by block), 'bias' (bias correction), 'lsq'
    (activation grids learned block by block) and 'qdrop' (with lsq or brecq), e.g.
    'mse+adaround+bias' or 'mse+brecq+lsq+qdrop'."""
    parts = [p for p in text.strip().split("+") if p]
    unknown = [p for p in parts if p not in METHOD_PARTS]
    if (
        not parts
        or unknown
        or ("nearest" in parts and len(parts) > 1)
        or {"adaround", "brecq"} <= set(parts)
    ):
        raise ConfigError(
            f"a method is 'nearest' or a '+'-joined set of mse, adaround or brecq, bias, lsq "
            f"and qdrop (e.g. mse+adaround+bias, mse+brecq+lsq+qdrop), got {text!r}"
        )
    rounding = next((r for r in ("adaround", "brecq") if r in parts), "nearest")
    return Method(
        weight_clip="mse" if "mse" in parts else "max",
        rounding=rounding,
        bias_correction="bias" in parts,
        learned_grids="lsq" in parts,
        qdrop="qdrop" in parts,
    )


# --- weight scales ------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("bits", "scale_bits", "clip"))
def weight_scales(kernel: jax.Array, bits: int, scale_bits: int, clip: str) -> jax.Array:
    """A kernel's per-output-channel scales by `clip` ('max' or 'mse'), one program per
    kernel shape (eagerly, each of their few operations would compile on its own)."""
    if clip == "mse":
        return mse_channel_scales(kernel, bits, scale_bits)
    return channel_scales(kernel, bits, scale_bits)


def mse_channel_scales(kernel: jax.Array, bits: int, scale_bits: int, steps: int = 80) -> jax.Array:
    """Per-output-channel scales whose grid clips each channel where its squared rounding
    error is least (a search over clip ratios from 0.2 to 1 of max |w|)."""
    w = jnp.reshape(kernel, (-1, kernel.shape[-1]))
    peak = jnp.max(jnp.abs(w), axis=0)
    q = qmax(bits)

    def error(ratio):
        scale = round_scale(jnp.where(peak > 0, ratio * peak / q, 1.0), scale_bits)
        quantized = jnp.round(jnp.clip(w, -q * scale, q * scale) / scale) * scale
        return jnp.sum(jnp.square(w - quantized), axis=0), scale

    errors, scales = jax.lax.map(error, jnp.linspace(0.2, 1.0, steps))
    return scales[jnp.argmin(errors, axis=0), jnp.arange(w.shape[1])]


# --- a layer's output error as a quadratic form --------------------------------------------


@dataclasses.dataclass
class Moments:
    """Second moments of one layer's input over the calibration images, per weight group.

    A layer is G independent problems of n inputs and m outputs: a dense or ordinary conv is
    one (n = k²·c_in patch entries), a depthwise conv one per channel (n = k² taps, m = 1).
    `qq`, `qf`, `ff` are E[x_q x_qᵀ], E[x_q x_fᵀ], E[x_f x_fᵀ] of the quantised network's
    input x_q and the float32 network's x_f, (G, n, n); `mean_q`, `mean_f` are (G, n).
    """

    qq: np.ndarray
    qf: np.ndarray
    ff: np.ndarray
    mean_q: np.ndarray
    mean_f: np.ndarray


def patches(x: jax.Array, module: nn.Module, every: int = 1) -> jax.Array:
    """The layer's input as (positions, G, n): what each output element sees (every
    `every`-th position only)."""
    if not isinstance(module, Conv2d):
        return x.reshape(-1, 1, x.shape[-1])[::every]
    views = [
        v.reshape(-1, v.shape[-1])[::every]
        for _, v in shifted_windows(x, module.kernel_size, module.stride, module.padding)
    ]
    if module.groups == 1:  # (i, j, c): the HWIO kernel's order
        return jnp.concatenate(views, axis=-1)[:, None]
    return jnp.stack(views, axis=-1)  # (position, channel, tap)


def positions_stride(x: jax.Array, module: nn.Module) -> int:
    """A depthwise conv's per-channel moments are slow to form; a strided subset of the
    positions (about DEPTHWISE_POSITIONS a batch) estimates them as well."""
    if not isinstance(module, Conv2d) or module.groups == 1:
        return 1
    return max(1, x.size // x.shape[-1] // DEPTHWISE_POSITIONS)


def grouped_kernel(kernel: np.ndarray, depthwise: bool) -> np.ndarray:
    """HWIO kernel -> (G, n, m) as `patches` orders its inputs."""
    if depthwise:
        return kernel.reshape(-1, kernel.shape[-1]).T[:, :, None]
    return kernel.reshape(-1, kernel.shape[-1])[None]


def ungrouped_kernel(grouped: np.ndarray, shape: tuple[int, ...], depthwise: bool) -> np.ndarray:
    if depthwise:
        return grouped[:, :, 0].T.reshape(shape)
    return grouped[0].reshape(shape)


@dataclasses.dataclass
class _LayerInput:
    """Interceptor: keeps the input of the layer at `target` (after `quantizer`, if given,
    put every layer's input on its grid) and the layer itself."""

    target: str
    quantizer: ActivationQuantizer | None = None
    found: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __call__(self, next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        if not is_layer_call(context):
            return next_fun(*args, **kwargs)

        def run(x, *rest, **kw):
            if kernel_path(context.module) == self.target:
                self.found["x"], self.found["module"] = x.astype(jnp.float32), context.module
            return next_fun(x, *rest, **kw)

        if self.quantizer is None:
            return run(*args, **kwargs)
        return self.quantizer(run, args, kwargs, context)


def _layer_input(model, variables, x, target, run, quantizer=None):
    capture = _LayerInput(target, quantizer)
    with nn.intercept_methods(capture):
        model.apply(variables, x, train=False, method=run)
    return capture.found["x"], capture.found["module"]


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _moment_sums(model, bits, target, run, variables_q, variables_f, ranges, x_q, x_f):
    """Sums over one batch of the products that make up `Moments` (and the position count),
    from the inputs x_q, x_f of the segment `run` that holds the target layer (only the
    segment up to that layer is computed: XLA drops the rest)."""
    quantizer = ActivationQuantizer(bits, ranges)
    layer_f, module = _layer_input(model, variables_f, x_f, target, run)
    layer_q, _ = _layer_input(model, variables_q, x_q, target, run, quantizer)
    every = positions_stride(layer_q, module)
    p_q, p_f = patches(layer_q, module, every), patches(layer_f, module, every)
    return {
        "qq": jnp.einsum("pgi,pgj->gij", p_q, p_q),
        "qf": jnp.einsum("pgi,pgj->gij", p_q, p_f),
        "ff": jnp.einsum("pgi,pgj->gij", p_f, p_f),
        "mean_q": jnp.sum(p_q, axis=0),
        "mean_f": jnp.sum(p_f, axis=0),
        "count": jnp.asarray(p_q.shape[0], jnp.float32),
    }


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _segment_output(model, bits, run, variables, ranges, x):
    """A segment's output, its layers' inputs on their grids when `bits` is given."""
    if bits is None:
        return model.apply(variables, x, train=False, method=run)
    with nn.intercept_methods(ActivationQuantizer(bits, ranges)):
        return model.apply(variables, x, train=False, method=run)


def layer_moments(
    model: nn.Module,
    bits: BitWidths,
    target: str,
    run: Callable,
    variables_q: dict,
    variables_f: dict,
    ranges: dict,
    inputs_q: Sequence[jax.Array],
    inputs_f: Sequence[jax.Array],
) -> Moments:
    """`Moments` of the layer at `target` in segment `run`, over the segment's input batches
    in the quantised network (`inputs_q`) and the float32 one (`inputs_f`)."""
    total: dict[str, np.ndarray] = {}
    for x_q, x_f in zip(inputs_q, inputs_f, strict=True):
        sums = _moment_sums(model, bits, target, run, variables_q, variables_f, ranges, x_q, x_f)
        for key, value in sums.items():
            total[key] = total.get(key, 0.0) + np.asarray(value, np.float64)
    count = total.pop("count")
    return Moments(**{key: value / count for key, value in total.items()})


# --- rounding -----------------------------------------------------------------------------

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid, so h reaches 0 and 1 exactly


def _soft_rounding(v: jax.Array) -> jax.Array:
    return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def output_error(weights: jax.Array, reference: jax.Array, m: Moments | dict) -> jax.Array:
    """E‖x_qᵀw̃ − x_fᵀw‖² summed over outputs, from the moments (weights (G, n, m))."""
    qq, qf, ff = (jnp.asarray(m[k] if isinstance(m, dict) else getattr(m, k)) for k in QUAD)
    return (
        jnp.sum(weights * (qq @ weights))
        - 2 * jnp.sum(weights * (qf @ reference))
        + jnp.sum(reference * (ff @ reference))
    )


QUAD = ("qq", "qf", "ff")


@functools.partial(jax.jit, static_argnames=("bits", "iterations"))
def adaround(
    weights: jax.Array,
    mask: jax.Array,
    scale: jax.Array,
    moments: dict,
    bits: int,
    iterations: int = 2000,
    regularisation: float = 1.0,
    learning_rate: float = 0.01,
) -> jax.Array:
    """Integer codes (G, n, m) of `weights` on `scale`·{-q..q}, each rounded down or up as
    learned (AdaRound): a soft rounding h(V) ∈ [0, 1] per weight minimises the layer's output
    error (relative to rounding to nearest) plus a term, annealed from β = 20 to 2 after a
    fifth of the iterations, that drives every h to 0 or 1."""
    q = qmax(bits)
    scaled = weights / scale
    floor = jnp.floor(scaled)
    rest = jnp.clip(scaled - floor, 1e-4, 1 - 1e-4)
    v0 = -jnp.log((ZETA - GAMMA) / (rest - GAMMA) - 1)

    def quantized(h):
        return jnp.clip(floor + h, -q, q) * scale * mask

    nearest = output_error(nearest_codes(weights, scale, bits) * scale * mask, weights, moments)
    norm = jnp.maximum(nearest, 1e-12)
    count = jnp.maximum(jnp.sum(mask), 1.0)
    warmup = iterations // 5

    def loss(v, beta, on):
        h = _soft_rounding(v)
        error = output_error(quantized(h), weights, moments) / norm
        drive = jnp.sum(mask * (1 - jnp.abs(2 * h - 1) ** beta)) / count
        return error + on * regularisation * drive

    optimizer = optax.adam(learning_rate)

    def step(carry, i):
        v, state = carry
        progress = jnp.clip((i - warmup) / max(iterations - warmup, 1), 0.0, 1.0)
        beta = 20.0 + (2.0 - 20.0) * progress
        grads = jax.grad(loss)(v, beta, (i >= warmup).astype(jnp.float32))
        updates, state = optimizer.update(grads, state)
        return (optax.apply_updates(v, updates), state), None

    (v, _), _ = jax.lax.scan(step, (v0, optimizer.init(v0)), jnp.arange(iterations))
    learned = jnp.clip(floor + (v >= 0), -q, q) * mask
    better = output_error(learned * scale, weights, moments) <= nearest
    return jnp.where(better, learned, nearest_codes(weights, scale, bits) * mask)


def nearest_codes(weights: jax.Array, scale: jax.Array, bits: int) -> jax.Array:
    q = qmax(bits)
    return jnp.round(jnp.clip(weights, -q * scale, q * scale) / scale)


_nearest_codes = jax.jit(nearest_codes, static_argnames="bits")


@functools.partial(jax.jit, static_argnames="bits")
def _nearest_on_groups(w: jax.Array, scale: jax.Array, moments: dict, bits: int):
    """(mask of kept weights, codes rounded to nearest, their output error) of a grouped
    kernel (G, n, m): one program per layer shape."""
    mask = (w != 0).astype(jnp.float32)
    nearest = nearest_codes(w, scale, bits) * mask
    return mask, nearest, output_error(nearest * scale, w, moments)


@jax.jit
def _codes_error(codes: jax.Array, scale: jax.Array, w: jax.Array, moments: dict):
    """(the codes' values, their output error)."""
    values = codes * scale
    return values, output_error(values, w, moments)


# --- the whole network --------------------------------------------------------------------


@dataclasses.dataclass
class LayerReport:
    """What quantising one kernel did to its layer's output (mean squared error over the
    calibration positions, summed over output channels)."""

    path: str
    error_nearest: float  # rounded to nearest on the chosen scales
    error: float  # after the method (equal for plain rounding)


class Reports(list):
    """One `LayerReport` per quantised kernel, in running order; `segments`: one
    `SegmentReport` per reconstructed segment (empty unless the method reconstructs)."""

    def __init__(self, layers: Sequence[LayerReport], segments: Sequence[Any] = ()) -> None:
        super().__init__(layers)
        self.segments = list(segments)


def post_training_quantize(
    model: nn.Module,
    variables: dict,
    images: np.ndarray,
    bits: BitWidths,
    method: Method = Method(),
    batch_size: int = 64,
    prepare: Callable[[jax.Array], jax.Array] | None = None,
    progress: Callable[[int], Any] | None = None,
    iterations: int = 2000,
    calibration: Calibration | None = None,
    reconstruction: Reconstruction | None = None,
) -> tuple[dict, Reports]:
    """The network on its grids, by `method`, calibrated on uint8 `images` (training images:
    never the ones it is measured on); see the module docstring. Returns (variables for
    `QuantizedApply(model, bits)`, one report per quantised kernel).

    Segment by segment (stem, each block, the exit head, the head): each segment's input is
    kept for all calibration images, in the quantised network and in the float32 one, so a
    layer's moments cost one pass over its own segment, not over the network before it.
    `calibration` (of the BN-folded network on the same images) saves recomputing the
    activation histograms; `progress(total)` makes a bar (`update`, `set_postfix_str`).
    Methods that reconstruct segments (`reconstruct`) do so after each segment's kernels
    are on their grids, with `reconstruction`'s settings (QDrop's rate from the method)."""
    if prepare is None:
        from micronet_jax.data.augment import eval_transform as prepare
    folded = fold_batch_norm(variables)
    image_batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    if calibration is None:
        calibration = calibrate(model, folded, image_batches, prepare)
    ranges = calibration.ranges(bits, method.activation_clip)
    params = {k: np.asarray(v) for k, v in _flat(folded["params"]).items()}
    order = layer_order(model, folded, inputs_shape(images))
    order = _fix_sixteen_bit_kernels(params, order, bits)
    walk = _SegmentWalk(model, bits, folded, ranges, params, method, iterations, reconstruction)
    if method.needs_data:
        walk.start([prepare(b) for b in image_batches])
    walk.float_kernels = dict(params)
    scales, reports = {}, []
    with _progress_bar(progress, len(order)) as bar:
        for segment in segments(model.arch):
            paths = [p for p in order if p.startswith(segment.scopes)]
            for path in paths:
                scales[scale_key(path)], report = walk.quantize_layer(segment, path)
                reports.append(report)
                bar(path)
            if method.needs_data:
                walk.advance(segment, paths, scales)
    quantized = {  # the walk's: reconstruction replaces its parameters and ranges
        "params": jax.tree_util.tree_map(jnp.asarray, _nested(walk.params)),
        "batch_stats": folded["batch_stats"],
        "quant": walk.ranges,
        "weight_scales": scales,
    }
    return quantized, Reports(reports, walk.segment_reports)


def _fix_sixteen_bit_kernels(params: dict, order: list[str], bits: BitWidths) -> list[str]:
    """Kernels at 16 bits become float16 values, fixed from the start (in `params`); the
    kernels left to quantise to integer codes, in the network's order."""
    for path in order:
        if INTEGER_BELOW <= bits.of(path)[0] < FULL:
            params[path] = np.asarray(fake_quant(jnp.asarray(params[path]), 1.0, 16))
    return [path for path in order if bits.of(path)[0] < INTEGER_BELOW]


@dataclasses.dataclass
class _SegmentWalk:
    """The network quantised segment by segment: `params` (flat, updated in place as each
    kernel gets its codes) and, with data, each finished segment's output on every
    calibration batch, in the quantised network (`inputs`) and in the float32 one
    (`float_inputs`), which the next segment's layers read."""

    model: nn.Module
    bits: BitWidths
    folded: dict
    ranges: dict
    params: dict
    method: Method
    iterations: int
    reconstruction: Reconstruction | None = None
    inputs: dict = dataclasses.field(default_factory=dict)
    float_inputs: dict = dataclasses.field(default_factory=dict)
    segment_reports: list = dataclasses.field(default_factory=list)
    float_kernels: dict = dataclasses.field(default_factory=dict)

    def start(self, batches: list[jax.Array]) -> None:
        self.inputs = {"image": batches}
        self.float_inputs = {"image": batches}

    def quantize_layer(self, segment: Any, path: str) -> tuple[jax.Array, LayerReport]:
        """The kernel at `path` on its grid (codes times scale, into `params`): its scale
        and its report."""
        weight_bits = self.bits.of(path)[0]
        kernel = jnp.asarray(self.params[path])
        scale = weight_scales(kernel, weight_bits, self.bits.scale_bits, self.method.weight_clip)
        if self.method.per_layer:
            moments = layer_moments(
                self.model,
                self.bits,
                path,
                segment.run,
                {**self.folded, "params": _nested(self.params)},
                self.folded,
                self.ranges,
                self.inputs[segment.source],
                self.float_inputs[segment.source],
            )
            codes, report = _round_layer(
                path, self.params, kernel, scale, moments, weight_bits, self.method, self.iterations
            )
        else:
            codes = np.asarray(_nearest_codes(kernel, scale, weight_bits))
            report = LayerReport(path, float("nan"), float("nan"))
        self.params[path] = (codes * np.asarray(scale)).astype(np.float32)
        return jnp.asarray(scale, jnp.float32), report

    def advance(self, segment: Any, paths: list[str], scales: dict) -> None:
        """`segment`'s outputs, float32 and quantised, for the segments that read them; with a
        reconstructing method, the segment's grids are learned first (on those outputs)."""
        run, model, bits = segment.run, self.model, self.bits
        self.float_inputs[segment.name] = [
            _segment_output(model, None, run, self.folded, {}, x)
            for x in self.float_inputs[segment.source]
        ]
        if self.method.reconstructs:
            options = dataclasses.replace(
                self.reconstruction or Reconstruction(), drop=QDROP if self.method.qdrop else 0.0
            )
            network = QuantisedNetwork(
                self.params,
                self.float_kernels,
                self.folded["batch_stats"],
                self.ranges,
                scales,
            )
            task = SegmentTask(
                segment,
                paths,
                self.inputs[segment.source],
                self.float_inputs[segment.name],
                rounding=self.method.rounding == "brecq",
                seed=len(self.segment_reports),
            )
            report, self.params, self.ranges = reconstruct_segment(
                model, bits, network, task, _nested, options
            )
            self.segment_reports.append(report)
        current = {**self.folded, "params": _nested(self.params)}
        self.inputs[segment.name] = [
            _segment_output(model, bits, run, current, self.ranges, x)
            for x in self.inputs[segment.source]
        ]


@contextlib.contextmanager
def _progress_bar(progress: Callable | None, total: int):
    """`progress(total)` -> a bar with .update(1) and .set_postfix_str, or nothing."""
    bar = progress(total) if progress else None

    def step(path: str) -> None:
        if bar is not None:
            bar.set_postfix_str(path.removesuffix("/kernel"))
            bar.update(1)

    try:
        yield step
    finally:
        if bar is not None:
            bar.close()


def layer_order(model: nn.Module, variables: dict, shape: tuple[int, ...]) -> list[str]:
    """Kernel paths of the conv and dense layers in the order the network runs them."""
    order: list[str] = []

    def record(next_fun, args, kwargs, context):
        if is_layer_call(context):
            order.append(kernel_path(context.module))
        return next_fun(*args, **kwargs)

    def run(v):
        with nn.intercept_methods(record):
            return model.apply(v, jnp.zeros(shape, jnp.float32), train=False)

    jax.eval_shape(run, variables)
    return order


def inputs_shape(images: np.ndarray) -> tuple[int, ...]:
    return (1, *images.shape[1:])


def _round_layer(path, params, kernel, scale, moments, bits, method, iterations):
    """(codes in the kernel's shape, report) of one layer, bias correction applied to
    `params` in place."""
    depthwise = is_depthwise(path)
    w = jnp.asarray(grouped_kernel(np.asarray(kernel), depthwise))
    s = np.asarray(scale).reshape((-1, 1, 1) if depthwise else (1, 1, -1))
    m = {k: np.asarray(getattr(moments, k), np.float32) for k in QUAD}
    mask, nearest, error_nearest = _nearest_on_groups(w, s, m, bits)
    if method.rounding == "adaround":
        codes = _padded_adaround(w, mask, s, m, bits, iterations)
    else:
        codes = nearest
    values, error = _codes_error(codes, s, w, m)
    error_nearest, error = float(error_nearest), float(error)
    if method.bias_correction:
        quantized = np.asarray(values, np.float64)
        mean_shift = np.einsum("gn,gnm->gm", moments.mean_q, quantized) - np.einsum(
            "gn,gnm->gm", moments.mean_f, np.asarray(w, np.float64)
        )
        bias = "/".join(bias_after(_nested(params), path))
        params[bias] = (params[bias] - mean_shift.reshape(-1)).astype(np.float32)
    shape = tuple(kernel.shape)
    return ungrouped_kernel(np.asarray(codes), shape, depthwise), LayerReport(
        path, error_nearest, error
    )


def _padded_adaround(w, mask, scale, moments, bits, iterations):
    """`adaround` on the problem padded with pruned weights to a few shapes (groups to 32s,
    inputs and outputs to 16s), so that the network's layers share a few programs."""
    shape = w.shape
    padded = tuple(
        size if size == 1 else -(-size // unit) * unit
        for size, unit in zip(shape, (32, 16, 16), strict=True)
    )

    def pad(x, dims, value=0.0):  # in NumPy: eager jnp.pad would compile per shape
        widths = [(0, padded[d] - x.shape[i]) for i, d in enumerate(dims)]
        return np.pad(np.asarray(x), widths, constant_values=value)

    m = {k: pad(v, (0, 1, 1)) for k, v in moments.items()}
    scale = np.broadcast_to(np.asarray(scale), shape)
    codes = adaround(
        pad(w, (0, 1, 2)),
        pad(mask, (0, 1, 2)),
        pad(scale, (0, 1, 2), 1.0),
        m,
        bits,
        iterations=iterations,
    )
    return np.asarray(codes)[: shape[0], : shape[1], : shape[2]]


def _flat(tree: dict) -> dict[str, Any]:
    return {path_name(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _nested(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        *scope, name = path.split("/")
        node = out
        for key in scope:
            node = node.setdefault(key, {})
        node[name] = value
    return out
