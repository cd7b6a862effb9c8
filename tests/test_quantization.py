"""Fake quantisation: the grids, weights per channel, activations at module boundaries,
calibration, BN folding, and qwix as the reference for the weight grids."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from micronet_jax.models.architecture import build_architecture
from micronet_jax.models.efficientnet import MicroNet, init_variables
from micronet_jax.models.fold import fold_batch_norm, folded_pairs
from micronet_jax.quant.fake import (
    ActivationRecorder,
    Calibration,
    QuantizedApply,
    calibrate,
    channel_scales,
    fake_quant,
    fake_quant_range,
    grid_error,
    qmax,
    quantize_weights,
    scale_key,
)
from micronet_jax.quant.widths import BitWidths
from micronet_jax.train.steps import predict

TINY = ("r1_k3_s1_e1_i8_o8_se0.25", "r1_k3_s2_e2_i8_o16_se0.25", "r1_k3_s1_e2_i16_o16_se0.25")


@functools.cache
def tiny():
    arch = build_architecture(TINY, width=1.0, resolution=1.0, head_filters=32, num_classes=10)
    model = MicroNet(arch.with_exit_head(1))
    variables = init_variables(model, jax.random.key(0))
    # BN statistics and affines away from the identity, so that folding has work to do
    keys = iter(jax.random.split(jax.random.key(5), 400))

    def perturb(path, x):
        name = path[-1].key
        if name in ("mean", "bias"):
            return x + 0.1 * jax.random.normal(next(keys), x.shape)
        if name in ("var", "scale"):
            return x * jnp.exp(0.3 * jax.random.normal(next(keys), x.shape))
        return x

    variables = {
        "params": jax.tree_util.tree_map_with_path(perturb, variables["params"]),
        "batch_stats": jax.tree_util.tree_map_with_path(perturb, variables["batch_stats"]),
    }
    images = np.random.default_rng(0).integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)
    return model, variables, images


def test_integer_grid_holds_zero_and_clips():
    scale = jnp.float32(0.5)
    x = jnp.array([0.0, 0.2, 0.26, -0.74, 3.49, 100.0, -100.0])
    y = fake_quant(x, scale, 4)  # grid 0.5·{-7..7}
    np.testing.assert_array_equal(np.asarray(y), [0.0, 0.0, 0.5, -0.5, 3.5, 3.5, -3.5])
    assert qmax(8) == 127 and qmax(4) == 7 and qmax(2) == 1


def test_straight_through_gradient_is_one_inside_the_range_zero_outside():
    grad = jax.grad(lambda x: jnp.sum(fake_quant(x, 0.5, 4, ste=True)))
    np.testing.assert_array_equal(np.asarray(grad(jnp.array([0.2, -3.4, 3.6, -9.0]))), [1, 1, 0, 0])


def test_sixteen_bits_round_to_float16_and_thirty_two_leave_values_alone():
    x = jnp.array([1.0 + 2**-12, 3.14159265], jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(fake_quant(x, 1.0, 16)), np.asarray(x.astype(jnp.float16), np.float32)
    )
    assert fake_quant(x, 1.0, 32) is x


def test_weights_per_output_channel_keep_pruned_zeros_and_skip_biases():
    model, variables, _ = tiny()
    params = variables["params"]
    kernel = params["blocks_1"]["expand_conv"]["kernel"]
    kernel = kernel.at[0, 0, :3, :].set(0.0)  # pruned weights
    params = {**params, "blocks_1": {**params["blocks_1"], "expand_conv": {"kernel": kernel}}}
    quantized = quantize_weights(params, BitWidths(4, 32))
    q = quantized["blocks_1"]["expand_conv"]["kernel"]
    scales = channel_scales(kernel, 4)
    steps = np.asarray(q / scales)
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-4)  # on each channel's grid
    assert np.abs(steps).max() <= 7 + 1e-4
    assert np.all(np.asarray(q)[0, 0, :3, :] == 0)  # masks kept exactly
    assert np.array_equal(np.abs(steps).max(axis=(0, 1, 2)).round(), np.full(q.shape[-1], 7))
    np.testing.assert_array_equal(  # biases and BN are left in float32
        quantized["fc"]["bias"], params["fc"]["bias"]
    )
    np.testing.assert_array_equal(quantized["stem_bn"]["scale"], params["stem_bn"]["scale"])


@pytest.mark.parametrize("bits, qtype", [(8, jnp.int8), (4, jnp.int4)])
def test_weight_grids_are_qwix_channelwise_absmax(bits, qtype):
    qwix = pytest.importorskip("qwix")
    kernel = jax.random.normal(jax.random.key(3), (3, 3, 16, 24))
    # qwix maps absmax to q + 0.5 (its bound); scaled by (q + 0.5)/q, absmax maps to q as ours
    factor = (qmax(bits) + 0.5) / qmax(bits)
    how = f"absmax,{factor!r}"
    qarray = qwix.quantize(kernel, qtype, channelwise_axes=(3,), calibration_method=how)
    reference = qwix.dequantize(qarray)
    ours = quantize_weights({"conv": {"kernel": kernel}}, BitWidths(bits, 32))["conv"]["kernel"]
    np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), rtol=1e-6, atol=1e-6)
    steps = np.asarray(qarray.qvalue)
    assert steps.min() >= -qmax(bits) and steps.max() <= qmax(bits)


def test_thirty_two_bits_is_the_plain_model():
    model, variables, images = tiny()
    plain = predict(model.apply, variables, images, 48)
    same = predict(QuantizedApply(model, BitWidths()), variables, images, 48)
    for a, b in zip(plain, same, strict=True):
        np.testing.assert_array_equal(a, b)


def test_every_conv_and_dense_input_is_quantised():
    model, variables, images = tiny()
    recorder = ActivationRecorder(jnp.max)
    import flax.linen as nn

    with nn.intercept_methods(recorder):
        model.apply(variables, jnp.zeros((4, 32, 32, 3)), train=False)
    kernels = [
        "/".join(str(k.key) for k in path)
        for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
        if path[-1].key == "kernel"
    ]
    assert sorted(recorder.found) == sorted(kernels)
    assert len(kernels) == 20  # 16 convs of the network, 2 of the exit head, 2 dense


def test_eight_bits_stay_close_and_four_bits_move_further():
    model, variables, images = tiny()
    prepare = functools.partial(_normalise)
    calibration = calibrate(model, variables, [images[:24]], prepare)
    plain, _ = predict(model.apply, variables, images, 48)
    errors = {}
    for bits in (8, 4):
        widths = BitWidths(bits, bits)
        quant = {"quant": calibration.ranges(widths)}
        logits, _ = predict(QuantizedApply(model, widths), {**variables, **quant}, images, 48)
        errors[bits] = float(np.abs(logits - plain).max() / np.abs(plain).max())
    assert errors[8] < 0.01 and errors[4] > 3 * errors[8]


def _normalise(batch):
    from micronet_jax.data.augment import eval_transform

    return eval_transform(batch)


def test_activation_grid_holds_zero_and_spends_its_levels_on_the_range():
    bounds = jnp.array([-0.25, 2.0])  # a swish output's range
    x = jnp.array([-1.0, -0.2, 0.0, 0.003, 1.0, 1.9, 5.0])
    y = np.asarray(fake_quant_range(x, bounds, 8))
    step = 2.25 / 255
    zero = round(0.25 / step)
    np.testing.assert_allclose(y / step, np.round(y / step), atol=1e-4)  # on the grid
    assert y[2] == 0.0 and y[3] == pytest.approx(0.0, abs=step)  # 0 exactly, small to 0
    assert y[0] == pytest.approx(-zero * step) and y[-1] == pytest.approx((255 - zero) * step)
    grad = jax.grad(lambda x: jnp.sum(fake_quant_range(x, bounds, 8, ste=True)))(x)
    np.testing.assert_array_equal(np.asarray(grad), [0, 1, 1, 1, 1, 1, 0])


def test_calibration_max_spans_the_range_and_mse_clips_a_long_tail():
    histogram = np.zeros(2048)
    histogram[200:300] = 1000.0  # most values small, just above 0 (the range is [-1, 10])
    histogram[-1] = 1.0  # one outlier at the top
    cal = Calibration({"fc/kernel": -1.0}, {"fc/kernel": 10.0}, {"fc/kernel": histogram})
    np.testing.assert_allclose(cal.ranges(BitWidths(4, 4), "max")["fc"], [-1.0, 10.0])
    low, high = np.asarray(cal.ranges(BitWidths(4, 4), "mse")["fc"])
    assert -1.0 <= low <= 0.0 and high < 10.0 / 4
    assert grid_error(*_centres(histogram, -1, 10), low, high, 4) < grid_error(
        *_centres(histogram, -1, 10), -1.0, 10.0, 4
    )
    assert cal.ranges(BitWidths(8, 32)) == {}  # float inputs need no grid
    assert scale_key("blocks_3/expand_conv/kernel") == "blocks_3.expand_conv"


def _centres(histogram, low, high):
    edges = np.linspace(low, high, len(histogram) + 1)
    return (edges[:-1] + edges[1:]) / 2, histogram / histogram.sum()


def test_folded_batch_norm_computes_the_same_and_keeps_zeros():
    model, variables, images = tiny()
    folded = fold_batch_norm(variables)
    assert folded_pairs(variables["params"]) == 1 + (2 + 3 + 3) + 1 + 2  # stem, blocks, head, exit
    plain_main, plain_exit = predict(model.apply, variables, images, 48)
    main, exits = predict(model.apply, folded, images, 48)
    np.testing.assert_allclose(main, plain_main, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(exits, plain_exit, rtol=1e-4, atol=1e-4)
    bn = folded["params"]["blocks_1"]["bn0"]
    np.testing.assert_array_equal(bn["scale"], np.ones_like(bn["scale"]))
    zeros = variables["params"]["stem_conv"]["kernel"] == 0
    assert np.all(np.asarray(folded["params"]["stem_conv"]["kernel"])[np.asarray(zeros)] == 0)


def _quant_state(bits: BitWidths, distill: bool, sparsity: float = 0.0):
    import optax

    from micronet_jax.data.augment import eval_transform
    from micronet_jax.train import pruning
    from micronet_jax.train.qat import create_quant_state

    model, variables, images = tiny()
    masks = pruning.prune_masks(variables["params"], sparsity, None, lambda _: True)
    ranges = calibrate(model, variables, [images[:24], images[24:]], eval_transform).ranges(
        bits, "max"
    )
    tx = optax.sgd(0.05, momentum=0.9)
    state = create_quant_state(model, variables, ranges, tx, 0, masks, bits, distill)
    batch = {"image": jnp.asarray(images[:16]), "label": jnp.arange(16) % 10}
    return state, batch


def _quant_step(state, batch, bits, distill, freeze_bn):
    from micronet_jax.train.qat import QuantStepConfig, quant_step_function
    from micronet_jax.train.steps import StepConfig

    base = StepConfig(autoaugment=False, lr_fn=lambda step: jnp.float32(0.05))
    step = quant_step_function(QuantStepConfig(base, bits, distill, 1.0, freeze_bn))
    return jax.jit(step)(state, batch, jax.random.key(3))


def _changed(a, b) -> bool:
    leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x, y: jnp.any(x != y), a, b))
    return bool(any(leaves))


def test_distilling_from_itself_at_full_precision_does_not_move():
    """At 32 bits the student is its teacher: agreement 1 and a zero gradient (soft-target
    cross entropy is stationary where the distributions match), so nothing changes."""
    bits = BitWidths(32, 32)
    state, batch = _quant_state(bits, distill=True)
    new, metrics = _quant_step(state, batch, bits, distill=True, freeze_bn=True)
    assert float(metrics["accuracy"]) == 1.0
    for moved, start in zip(
        jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(state.params), strict=True
    ):
        np.testing.assert_allclose(moved, start, atol=1e-6)


def test_quantised_student_learns_towards_its_teacher_with_bn_frozen_and_masks_kept():
    """On its 4-bit grids the student starts away from its float32 teacher; a few steps of
    distillation on one batch bring it closer (the distillation loss, measured by each step
    before its update, falls), with BN frozen and pruned weights still zero."""
    bits = BitWidths(4, 4)
    state, batch = _quant_state(bits, distill=True, sparsity=50.0)
    new, metrics = _quant_step(state, batch, bits, distill=True, freeze_bn=True)
    assert _changed(new.params, state.params)  # 4-bit grids move off the teacher: a gradient
    assert not _changed(new.batch_stats, state.batch_stats)
    losses = [float(metrics["loss"])]
    for _ in range(5):
        new, later = _quant_step(new, batch, bits, distill=True, freeze_bn=True)
        losses.append(float(later["loss"]))
    assert losses[-1] < losses[0], losses
    for mask, kernel in zip(
        jax.tree_util.tree_leaves(state.masks), jax.tree_util.tree_leaves(new.params), strict=True
    ):
        assert np.all(np.asarray(kernel)[np.asarray(mask) == 0] == 0)
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0 and np.isfinite(float(metrics["loss"]))


def test_without_freezing_the_step_updates_batch_statistics():
    bits = BitWidths(8, 8)
    state, batch = _quant_state(bits, distill=False)
    new, _ = _quant_step(state, batch, bits, distill=False, freeze_bn=False)
    assert _changed(new.batch_stats, state.batch_stats)


def test_depthwise_inputs_get_a_grid_per_channel():
    """Calibrated on a batch, a depthwise input's grids are its channels' own ranges (each
    holding 0); with `depthwise_channels=False` one range spans them all. Channel ranges
    far apart (as after the stem) are what the per-channel grids are for: they quantise the
    depthwise input with less error than one grid for the tensor."""
    from micronet_jax.data.augment import eval_transform

    model, variables, images = tiny()
    cal = calibrate(model, variables, [images[:24], images[24:]], eval_transform)
    path = "blocks_0/depthwise_conv/kernel"
    recorder = ActivationRecorder(lambda x: x)
    with nn.intercept_methods(recorder):
        model.apply(variables, eval_transform(images), train=False)
    x = np.asarray(recorder.found[path])
    per_channel = np.asarray(cal.ranges(BitWidths(8, 8))["blocks_0.depthwise_conv"])
    np.testing.assert_allclose(per_channel[0], np.minimum(x.min((0, 1, 2)), 0), rtol=1e-5)
    np.testing.assert_allclose(per_channel[1], np.maximum(x.max((0, 1, 2)), 0), rtol=1e-5)
    whole = np.asarray(
        cal.ranges(BitWidths(8, 8, depthwise_channels=False), "max")["blocks_0.depthwise_conv"]
    )
    assert whole.shape == (2,)
    assert whole[0] == pytest.approx(per_channel[0].min()) and whole[1] == pytest.approx(
        per_channel[1].max()
    )
    spread = x * np.geomspace(0.01, 1.0, x.shape[-1])  # channels two decades apart
    lows, highs = np.minimum(spread.min((0, 1, 2)), 0), np.maximum(spread.max((0, 1, 2)), 0)
    by_channel = fake_quant_range(jnp.asarray(spread), jnp.asarray(np.stack([lows, highs])), 4)
    by_tensor = fake_quant_range(jnp.asarray(spread), jnp.asarray([lows.min(), highs.max()]), 4)
    error_channel = np.mean((np.asarray(by_channel) - spread) ** 2, axis=(0, 1, 2))
    error_tensor = np.mean((np.asarray(by_tensor) - spread) ** 2, axis=(0, 1, 2))
    assert np.all(error_channel <= error_tensor * 1.01)  # (the widest channel is the same)
    assert error_channel[0] < error_tensor[0] / 20  # the narrowest channel: a finer grid
