"""Post-training quantisation: the moments that stand for a layer's output error, the rounding
and refit solvers, bias correction, and the whole network on its grids (tiny network)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from test_quantization import tiny

from micronet_jax.errors import ConfigError
from micronet_jax.models.conv import conv2d
from micronet_jax.models.efficientnet import segments
from micronet_jax.models.fold import fold_batch_norm
from micronet_jax.models.layers import Conv2d, Dense
from micronet_jax.models.paths import path_name
from micronet_jax.quant.fake import QuantizedApply, channel_scales, qmax, scale_key
from micronet_jax.quant.ptq import (
    Method,
    Moments,
    adaround,
    grouped_kernel,
    layer_order,
    mse_channel_scales,
    nearest_codes,
    output_error,
    parse_method,
    patches,
    post_training_quantize,
)
from micronet_jax.quant.widths import BitWidths


def moments_of(x_q: np.ndarray, x_f: np.ndarray, module: nn.Module) -> Moments:
    p_q, p_f = (np.asarray(patches(jnp.asarray(x), module), np.float64) for x in (x_q, x_f))
    count = p_q.shape[0]
    return Moments(
        np.einsum("pgi,pgj->gij", p_q, p_q) / count,
        np.einsum("pgi,pgj->gij", p_q, p_f) / count,
        np.einsum("pgi,pgj->gij", p_f, p_f) / count,
        p_q.mean(0),
        p_f.mean(0),
    )


LAYERS = {  # (module, input shape): the kinds of layer the network has
    "stem 3x3 stride 2, TF-same padding": (Conv2d(6, 3, 2, (0, 1)), (2, 9, 9, 3)),
    "depthwise 3x3": (Conv2d(5, 3, 1, (1, 1), groups=5), (2, 7, 7, 5)),
    "depthwise 3x3 stride 2": (Conv2d(4, 3, 2, (0, 1), groups=4), (2, 8, 8, 4)),
    "1x1": (Conv2d(7), (2, 5, 5, 6)),
    "dense": (Dense(3), (11, 8)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_moments_give_the_layer_output_error(name):
    """E‖conv(x_q, w̃) − conv(x_f, w)‖² per position, summed over outputs, computed directly
    equals the quadratic form on the moments: the patches are ordered as the kernel is."""
    module, shape = LAYERS[name]
    rng = np.random.default_rng(0)
    x_f = rng.normal(size=shape).astype(np.float32)
    x_q = (x_f + 0.1 * rng.normal(size=shape)).astype(np.float32)
    kernel = module.init(jax.random.key(0), jnp.asarray(x_f))["params"]["kernel"]
    kernel_q = kernel + 0.05 * jax.random.normal(jax.random.key(1), kernel.shape)

    def run(x, k):
        if isinstance(module, Dense):
            return np.asarray(x @ k, np.float64)
        y = conv2d(jnp.asarray(x), k, module.stride, module.padding, module.groups, "xla")
        return np.asarray(y, np.float64)

    direct = np.sum((run(x_q, kernel_q) - run(x_f, kernel)) ** 2) / np.prod(
        run(x_f, kernel).shape[:-1]
    )
    depthwise = isinstance(module, Conv2d) and module.groups > 1
    moments = moments_of(x_q, x_f, module)
    w = grouped_kernel(np.asarray(kernel, np.float64), depthwise)
    w_q = grouped_kernel(np.asarray(kernel_q, np.float64), depthwise)
    quadratic = float(output_error(jnp.asarray(w_q), jnp.asarray(w), moments))
    assert quadratic == pytest.approx(direct, rel=1e-4)


def synthetic_layer(seed=0, n=24, m=6, samples=400, sparsity=0.4, noise=0.05):
    """Inputs that share a common part (as neighbouring pixels and channels do: with
    independent inputs, rounding to nearest is already best), a perturbed copy of them, a
    pruned kernel, and their moments."""
    rng = np.random.default_rng(seed)
    x_f = rng.normal(size=(samples, 1, 1)) + 0.2 * rng.normal(size=(samples, 1, n))
    x_q = x_f + noise * rng.normal(size=x_f.shape)
    w = rng.normal(size=(1, n, m)) * (rng.random((1, n, m)) > sparsity)
    pairs = ((x_q, x_q), (x_q, x_f), (x_f, x_f))
    moments = Moments(
        *(np.einsum("pgi,pgj->gij", a, b) / samples for a, b in pairs),
        x_q.mean(0),
        x_f.mean(0),
    )
    return w, moments


@pytest.mark.parametrize("bits", [4, 8])
def test_adaround_lowers_the_output_error_and_stays_on_grid(bits):
    w, moments = synthetic_layer(n=48, m=8, noise=0.0)
    mask = (w != 0).astype(np.float32)
    scale = np.max(np.abs(w), axis=1, keepdims=True) / qmax(bits)
    m = {k: jnp.asarray(getattr(moments, k), jnp.float32) for k in ("qq", "qf", "ff")}
    args = (jnp.asarray(w, jnp.float32), jnp.asarray(mask), jnp.asarray(scale, jnp.float32))
    codes = np.asarray(adaround(*args, m, bits, iterations=2000))
    nearest = np.asarray(nearest_codes(args[0], args[2], bits)) * mask
    assert np.all(codes == np.round(codes)) and np.all(np.abs(codes) <= qmax(bits))
    assert np.all(codes[mask == 0] == 0)
    assert np.all(np.abs(codes - w / scale) < 1 + 1e-6)  # each weight rounded down or up
    learned = float(output_error(jnp.asarray(codes * scale), args[0], m))
    plain = float(output_error(jnp.asarray(nearest * scale), args[0], m))
    assert learned < 0.5 * plain


def test_mse_scales_round_each_channel_no_worse_than_max():
    rng = np.random.default_rng(2)
    kernel = rng.standard_t(3, size=(3, 3, 8, 12)).astype(np.float32)  # heavy tails: outliers
    for bits in (4, 8):
        errors = {}
        for name, scales in (
            ("max", channel_scales(jnp.asarray(kernel), bits)),
            ("mse", mse_channel_scales(jnp.asarray(kernel), bits, 32)),
        ):
            codes = nearest_codes(jnp.asarray(kernel), scales, bits)
            errors[name] = np.sum((kernel - np.asarray(codes * scales)) ** 2, axis=(0, 1, 2))
        assert np.all(errors["mse"] <= errors["max"] + 1e-7)
        if bits == 4:  # at 4 bits clipping the outliers pays
            assert np.sum(errors["mse"]) < 0.9 * np.sum(errors["max"])


def test_method_names_parse_and_bad_ones_are_refused():
    assert parse_method("nearest") == Method()
    method = parse_method("mse+adaround+bias")
    assert (method.weight_clip, method.rounding, method.bias_correction) == (
        "mse",
        "adaround",
        True,
    )
    assert method.name == "mse+adaround+bias"
    for bad in ("", "gptq", "nearest+bias", "mse++x"):
        with pytest.raises(ConfigError, match="method"):
            parse_method(bad)


def test_segments_compose_to_the_whole_network():
    model, variables, images = tiny()
    x = jnp.asarray(images[:4], jnp.float32) / 255.0
    outputs = {"image": x}
    for segment in segments(model.arch):
        source = outputs[segment.source]
        outputs[segment.name] = model.apply(variables, source, method=segment.run)
    logits, exit_logits = model.apply(variables, x)
    np.testing.assert_array_equal(np.asarray(outputs["head"]), np.asarray(logits))
    np.testing.assert_array_equal(np.asarray(outputs["exit_head"]), np.asarray(exit_logits))
    scopes = [s for segment in segments(model.arch) for s in segment.scopes]
    order = layer_order(model, variables, (1, 32, 32, 3))
    assert all(any(p.startswith(s) for s in scopes) for p in order)


@functools.cache
def pruned_tiny():
    model, variables, images = tiny()
    keys = iter(jax.random.split(jax.random.key(3), 100))

    def prune(path, leaf):
        if path[-1].key == "kernel" and leaf.ndim > 1:
            return leaf * (jax.random.uniform(next(keys), leaf.shape) > 0.5)
        return leaf

    params = jax.tree_util.tree_map_with_path(prune, variables["params"])
    return model, {**variables, "params": params}, images


@functools.cache
def quantized_tiny(method: str):
    model, variables, images = pruned_tiny()
    return post_training_quantize(
        model,
        variables,
        images[:32],
        BitWidths(8, 8),
        parse_method(method),
        batch_size=16,
        iterations=300,
    )


# the tests of the learned rounding share one worker, so `quantized_tiny` runs it once
LEARNED = pytest.mark.xdist_group("tiny_learned_rounding")


@pytest.mark.parametrize(
    "method", ["nearest", pytest.param("mse+adaround+bias", marks=[pytest.mark.slow, LEARNED])]
)
def test_every_kernel_is_on_its_grid_with_pruned_weights_kept(method):
    model, variables, images = pruned_tiny()
    quantized, reports = quantized_tiny(method)
    float_params = {
        path_name(k): v
        for k, v in jax.tree_util.tree_flatten_with_path(fold_batch_norm(variables)["params"])[0]
    }
    kernels = {
        path_name(k): v
        for k, v in jax.tree_util.tree_flatten_with_path(quantized["params"])[0]
        if path_name(k).endswith("kernel") and v.ndim > 1
    }
    assert set(scale_key(p) for p in kernels) == set(quantized["weight_scales"])
    assert [r.path for r in reports] == layer_order(model, variables, (1, 32, 32, 3))
    for path, kernel in kernels.items():
        codes = np.asarray(kernel) / np.asarray(quantized["weight_scales"][scale_key(path)])
        np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
        assert np.max(np.abs(np.round(codes))) <= 127
        np.testing.assert_array_equal(np.asarray(kernel)[float_params[path] == 0], 0.0)
    # fixed scales make the weight grids idempotent: evaluating quantises nothing further
    bits = BitWidths(8, 8)
    x = jnp.asarray(images[:8], jnp.float32) / 255.0
    again = QuantizedApply(model, bits)(quantized, x)
    without_scales = {k: v for k, v in quantized.items() if k != "weight_scales"}
    from micronet_jax.quant.fake import ActivationQuantizer

    with nn.intercept_methods(ActivationQuantizer(bits, quantized["quant"])):
        direct = model.apply(without_scales, x)
    np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(direct[0]))


@pytest.mark.slow
@LEARNED
def test_learned_rounding_lowers_every_layers_error():
    _, reports = quantized_tiny("mse+adaround+bias")
    assert all(r.error <= r.error_nearest * (1 + 1e-5) + 1e-12 for r in reports)
    assert sum(r.error for r in reports) < 0.99 * sum(r.error_nearest for r in reports)


@pytest.mark.slow
def test_bias_correction_cancels_the_mean_shift_of_the_first_layer():
    """The stem's output (before its swish), averaged over the calibration images, is the
    float32 network's once the mean shift its rounding left is taken off the bias."""
    model, variables, images = pruned_tiny()
    bits = BitWidths(4, 32)  # coarse weights: a clear shift; float inputs: same input

    def stem_output_mean(v, apply):
        found = {}

        def record(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if "/".join(context.module.path) == "stem_bn" and context.method_name == "__call__":
                found["y"] = out
            return out

        with nn.intercept_methods(record):
            apply(v, jnp.asarray(images[:32], jnp.float32) / 255.0)
        return np.asarray(jnp.mean(found["y"], axis=(0, 1, 2)))

    reference = stem_output_mean(fold_batch_norm(variables), QuantizedApply(model, BitWidths()))
    shifts = {}
    for method in ("nearest", "bias"):
        quantized, _ = post_training_quantize(
            model,
            variables,
            images[:32],
            bits,
            parse_method(method),
            batch_size=16,
            prepare=lambda b: jnp.asarray(b, jnp.float32) / 255.0,
        )
        got = stem_output_mean(quantized, QuantizedApply(model, bits))
        shifts[method] = np.max(np.abs(got - reference))
    assert shifts["bias"] < 1e-4 < shifts["nearest"]
