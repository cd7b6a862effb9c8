"""Quantisation that learns its grids, calibrates without data and mixes widths: block
reconstruction (LSQ step sizes, BRECQ rounding, QDrop), synthetic calibration images, the
width file, and the mixed-precision search."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from test_ptq import pruned_tiny
from tiny_run import TINY, main_env, run_main, tiny_config

from micronet_jax.data.augment import eval_transform
from micronet_jax.errors import ConfigError
from micronet_jax.models.fold import fold_batch_norm
from micronet_jax.models.paths import path_name
from micronet_jax.quant import mixed
from micronet_jax.quant.fake import QuantizedApply, activation_grid, calibrate, qmax, scale_key
from micronet_jax.quant.ptq import layer_order, parse_method, post_training_quantize
from micronet_jax.quant.reconstruct import Reconstruction, grid_bounds, learned_grid_quant
from micronet_jax.quant.synthetic import Synthesis, statistics_mismatch, synthesise
from micronet_jax.quant.widths import BitWidths, load_widths, save_widths
from micronet_jax.scoring.counter import count_micronet
from micronet_jax.train.steps import predict

# --- learned grids ----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_a_learned_grid_is_stored_as_bounds_that_give_it_back(bits):
    steps = jnp.asarray([0.013, 0.2, 1.7])
    zeros = jnp.asarray([0.4, 7.6, 2.0**bits + 3.0])  # the last one beyond the grid: clipped
    for step, zero in zip(steps, zeros, strict=True):
        low_high = grid_bounds(step, zero, bits, 16)
        got_step, got_zero = activation_grid(low_high, bits, 16)
        np.testing.assert_allclose(got_step, np.float16(step), rtol=1e-6)
        assert float(got_zero) == float(jnp.clip(jnp.round(zero), 0, 2**bits - 1))


def test_learned_grid_quantisation_lands_on_the_grid_and_passes_gradients():
    x = jnp.linspace(-3.0, 5.0, 101)
    step, zero = jnp.float32(0.07), jnp.float32(40.3)
    y = learned_grid_quant(x, step, zero, 8)
    codes = np.asarray(y / step + jnp.round(zero))
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    assert codes.min() >= 0 and codes.max() <= 255

    def loss(s, z):
        return jnp.sum(jnp.square(learned_grid_quant(x, s, z, 4) - x))

    grad_step, grad_zero = jax.grad(loss, argnums=(0, 1))(step, jnp.float32(7.3))
    assert grad_step != 0 and grad_zero != 0  # both learn: what they clip and how they round


@functools.cache
def reconstructed(method: str):
    model, variables, images = pruned_tiny()
    options = Reconstruction(iterations=80, batch_size=16)
    return post_training_quantize(
        model,
        variables,
        images[:32],
        BitWidths(4, 4),
        parse_method(method),
        batch_size=16,
        reconstruction=options,
    )


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mse+lsq", "mse+brecq+lsq+qdrop"])
def test_reconstruction_lowers_block_errors_and_leaves_valid_grids(method):
    """What the mechanism guarantees: a segment's learned grids and rounding are kept only
    where its error on the calibration images fell, so no segment ends worse and each kept
    one ends better. How much better depends on float rounding (XLA's summation order
    differs between CPUs, and the learned rounding's trajectory with it): the head, the
    segment with the most to learn, must lose a tenth of its error (measured: 39-54% of it
    under ulp perturbations of the start and XLA ISA caps emulating other CPUs). The
    stem's and first block's errors, 80% of the total, barely move at 4 bits, so a
    floor on the total measured the spread of those, not the learning."""
    model, variables, images = pruned_tiny()
    quantized, reports = reconstructed(method)
    segments = reports.segments
    assert [s.segment for s in segments][-1] == "head"
    assert all(s.error_after <= s.error_before for s in segments)
    assert all(s.error_after < s.error_before for s in segments if s.kept)
    assert sum(s.kept for s in segments) >= 1
    head = segments[-1]
    assert head.error_after <= 0.9 * head.error_before
    bits = BitWidths(4, 4)
    for bounds in quantized["quant"].values():
        step, zero = activation_grid(bounds, 4)
        assert np.all(np.asarray(step) > 0)
        assert np.all((np.asarray(zero) >= 0) & (np.asarray(zero) <= 15))
    flat_float = {
        path_name(k): np.asarray(v)
        for k, v in jax.tree_util.tree_flatten_with_path(fold_batch_norm(variables)["params"])[0]
    }
    for path in layer_order(model, variables, (1, 32, 32, 3)):
        kernel = np.asarray(
            functools.reduce(lambda t, k: t[k], path.split("/"), quantized["params"])
        )
        codes = kernel / np.asarray(quantized["weight_scales"][scale_key(path)])
        np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
        assert np.max(np.abs(np.round(codes))) <= qmax(bits.of(path)[0])
        np.testing.assert_array_equal(kernel[flat_float[path] == 0], 0.0)


# --- synthetic calibration --------------------------------------------------------------------


def with_statistics_of(model, variables, images, rounds: int = 8):
    """`variables` with every BN layer's running statistics those of its input on `images`
    (as training on them would leave them): set layer by layer, each round reaching one
    layer deeper, until nothing moves."""
    from flax import linen as nn

    from micronet_jax.models.layers import GhostBatchNorm

    stats = jax.tree_util.tree_map(np.asarray, variables["batch_stats"])
    x = eval_transform(jnp.asarray(images))
    seen = {}
    for _ in range(rounds):
        seen.clear()

        def record(next_fun, args, kwargs, context):
            if isinstance(context.module, GhostBatchNorm) and context.method_name == "__call__":
                value = args[0]
                axes = tuple(range(value.ndim - 1))
                seen[context.module.path] = (jnp.mean(value, axes), jnp.var(value, axes))
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            model.apply({**variables, "batch_stats": stats}, x, train=False)
        for path, (mean, var) in seen.items():
            node = functools.reduce(lambda tree, key: tree[key], path, stats)
            node["mean"], node["var"] = np.asarray(mean), np.asarray(var)
    return {**variables, "batch_stats": stats}


def smooth_images(count: int, seed: int) -> np.ndarray:
    """Images with the structure of natural ones: random colours varying slowly in space."""
    coarse = np.random.default_rng(seed).uniform(0, 255, (count, 4, 4, 3))
    return np.asarray(jax.image.resize(coarse, (count, 32, 32, 3), "linear")).astype(np.uint8)


def test_synthetic_images_match_the_bn_statistics_they_were_made_from():
    """The tiny network given the BN statistics of a set of smooth images: images made from
    those statistics alone reproduce them far better than noise or than other images."""
    model, variables, _ = pruned_tiny()
    variables = with_statistics_of(model, variables, smooth_images(64, seed=0))
    options = Synthesis(batch_size=16, iterations=80)
    images = synthesise(model, variables, 16, options, seed=3)
    assert images.dtype == np.uint8 and images.shape == (16, 32, 32, 3)
    np.testing.assert_array_equal(images, synthesise(model, variables, 16, options, seed=3))

    def mismatch(x):
        terms = statistics_mismatch(model, variables, jnp.asarray(x, jnp.float32))
        return sum(float(t) for t in terms)

    noise = np.random.default_rng(0).integers(0, 256, images.shape)
    assert mismatch(images) < 0.2 * mismatch(noise)
    assert mismatch(images) < mismatch(smooth_images(16, seed=1))  # closer than unseen data


# --- width files ------------------------------------------------------------------------------


def tiny_mixed_widths() -> BitWidths:
    model, variables, _ = pruned_tiny()
    order = layer_order(model, variables, (1, 32, 32, 3))
    return BitWidths(8, 8, ((order[0], 8, 16), (order[2], 4, 8), (order[-1], 6, 8)), True, 16)


def test_a_width_file_round_trips_and_is_counted_as_written(tmp_path):
    model, variables, _ = pruned_tiny()
    bits = tiny_mixed_widths()
    path = save_widths(tmp_path / "widths.json", bits)
    assert load_widths(path) == bits
    params = fold_batch_norm(variables)["params"]
    counted = count_micronet(model.arch, params=params, bn_as_bias=True, bits=load_widths(path))
    uniform = count_micronet(model.arch, params=params, bn_as_bias=True, bits=BitWidths(8, 8))
    written = count_micronet(model.arch, params=params, bn_as_bias=True, bits=bits)
    assert counted.score == written.score
    assert counted.score != uniform.score  # the per-layer widths reach the counter
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ConfigError, match="not a width file"):
        load_widths(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="no width file"):
        load_widths(tmp_path / "missing.json")


@pytest.mark.slow
def test_export_takes_a_width_file_and_calibrates_with_no_data(tiny_pipeline, tmp_path):
    """`--calibration=synthetic`: no archive anywhere; the width file's per-layer widths are
    what the card counts."""
    import subprocess
    import sys

    _, workdir, _ = tiny_pipeline
    bits = BitWidths(8, 8, (("stem_conv/kernel", 8, 16), ("fc/kernel", 4, 8)), True, 16)
    widths = save_widths(tmp_path / "widths.json", bits)
    out = tmp_path / "export"
    env = {k: v for k, v in main_env(None).items() if k != "MICRONET_DATA"}
    env["HOME"] = str(tmp_path)  # no data cache to find either
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "micronet_jax.export",
            f"--checkpoint={workdir}",
            f"--out={out}",
            f"--bits={widths}",
            "--calibration=synthetic",
            "--num_calibration=32",
            "--method=mse",
            "--learn_steps=0",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    card = json.loads((out / "card.json").read_text())
    quantized = card["quantized"]
    assert quantized["calibration"]["images"] == 32 and "synthetic" in quantized["calibration"]
    assert quantized["widths"] == bits.describe()
    assert "measured_on" not in card and "agreement_with_float32" not in quantized
    assert "model_int8.onnx" in card["files"]
    assert "scales 16-bit" in quantized["score"]["widths"]
    # the width file reached the file: the main classifier's kernel holds 4-bit codes, the
    # exit head's (8-bit, the file's default) codes beyond them
    graph = onnx.load(out / "model_int8.onnx")
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in graph.graph.initializer}
    producers = {o: n for n in graph.graph.node for o in n.output}

    def kernel_codes(name):
        node = producers[name]
        while node.op_type != "DequantizeLinear":
            node = producers[node.input[0]]
        return int(np.abs(constants[node.input[0]]).max())

    largest = sorted(kernel_codes(n.input[1]) for n in graph.graph.node if n.op_type == "Gemm")
    assert largest[0] <= 7 < largest[1]


@pytest.mark.slow
def test_test_mode_quantises_at_a_width_file_and_reports_agreement(
    tiny_pipeline, tiny_archive, tmp_path, compile_cache
):
    _, workdir, _ = tiny_pipeline
    bits = BitWidths(8, 8, (("fc/kernel", 6, 16),), True, 16)
    widths = save_widths(tmp_path / "widths.json", bits)
    scored = run_main(
        tmp_path / "test",
        tiny_archive,
        "--config.mode=test",
        f"--config.checkpoint={workdir}",
        f"--config.quant.widths_file={widths}",
        "--config.quant.calibration_images=64",
        config=f"{TINY}:pipeline",
        env=main_env(compile_cache),
        timeout=600,
    )
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert "post-training quantisation: weights 8-bit, activations 8-bit" in scored.stdout
    report = json.loads((tmp_path / "test" / "report.json").read_text())
    assert "fc/kernel 6/16" in json.dumps(report)

    # the width file reached the network that was measured and scored: the report's numbers
    # are those of the checkpoint quantised here at the file's widths, and not at 8x8
    from micronet_jax.config import builders
    from micronet_jax.evaluation.early_exit import agreement, exit_predict_exact
    from micronet_jax.quant.fake import quantize_weights
    from micronet_jax.recipe.pipeline import load_checkpoint

    config = tiny_config("pipeline")
    config.checkpoint, config.data.dir = str(workdir), str(tiny_archive)
    config.quant.calibration_images = 64
    checkpoint = load_checkpoint(config, "mode=test")
    model, variables = checkpoint.model, checkpoint.variables
    train, test = builders.load_data(config)
    method = parse_method(config.quant.ptq_method)
    threshold, batch = config.pipeline.threshold, config.train.eval_batch_size

    def measured(widths: BitWidths) -> tuple[dict, dict]:
        quantised, _ = post_training_quantize(model, variables, train.images[:64], widths, method)
        result = exit_predict_exact(
            model, quantised, test.images, threshold, batch, QuantizedApply(model, widths)
        )
        float32 = exit_predict_exact(model, variables, test.images, threshold, batch)
        weights = quantize_weights(quantised["params"], widths)
        score = count_micronet(
            model.arch, params=weights, exit_ratio=result.exit_ratio,
            bn_as_bias=True, bits=widths,
        )  # fmt: skip
        return agreement(result, float32), score.to_dict()

    agreed, score = measured(bits)
    assert report["metrics"]["main_agreement"] == pytest.approx(agreed["main"], abs=1e-9)
    assert report["score_quantized"]["param_score"] == pytest.approx(score["param_score"])
    _, uniform = measured(BitWidths(8, 8, (), True, 16))
    assert report["score_quantized"]["param_score"] != pytest.approx(uniform["param_score"])


# --- mixed precision --------------------------------------------------------------------------


def test_the_mixed_precision_search_honours_its_floor():
    """On the tiny network, with widths coarse enough to change its predictions: every
    configuration the sweep proposes is measured (real post-training quantisation, agreement
    with float32 on held-out images); the one returned meets the floor, and every cheaper one
    measured misses it."""
    model, variables, images = pruned_tiny()
    calibration, held_out = images[:16], images[16:]
    base = BitWidths(8, 8)
    folded = fold_batch_norm(variables)
    info = mixed.fisher(model, variables, calibration)
    ranges = calibrate(model, folded, [calibration], eval_transform).ranges(base)

    def score(bits):
        return count_micronet(model.arch, params=folded["params"], bn_as_bias=True, bits=bits).score

    table = mixed.option_table(info, folded["params"], ranges, base, score, (2, 8), (2, 16))
    candidates = mixed.sweep(table, base, mixed.multipliers(table))
    assert len(candidates) >= 3
    reference = np.asarray(predict(model.apply, variables, held_out, 16)[0])

    def measure(bits):
        quantized, _ = post_training_quantize(
            model, variables, calibration, bits, parse_method("nearest"), batch_size=16
        )
        got = np.asarray(predict(QuantizedApply(model, bits), quantized, held_out, 16)[0])
        logits_error = float(np.mean(np.square(got - reference)))
        return {"score": score(bits), "closeness": -logits_error}

    for candidate in candidates:
        candidate.measured = measure(candidate.bits)
    floor = float(np.median([c.measured["closeness"] for c in candidates]))
    chosen, every = mixed.search(candidates, measure, floor, key="closeness")
    assert chosen is not None and chosen.measured["closeness"] >= floor
    cheaper = [c for c in every if c.measured["score"] < chosen.measured["score"]]
    assert all(c.measured["closeness"] < floor for c in cheaper)
    front = mixed.pareto_frontier(every, key="closeness")
    assert chosen in front
    for cheaper_one, dearer_one in zip(front, front[1:], strict=False):
        assert cheaper_one.measured["score"] <= dearer_one.measured["score"]
        assert cheaper_one.measured["closeness"] < dearer_one.measured["closeness"]


# --- learning the fake quantisation -------------------------------------------------------------


@pytest.mark.parametrize("lr", [0.001, 50.0])
def test_learned_fake_quantisation_is_kept_only_when_nearer_on_held_out_images(lr):
    """`learn_fake_quant` judges its result on the images it held out of learning: it returns
    the learned variables only when their KL from the float32 network there is lower, else the
    post-training ones unchanged. A rate of 50 (relative to each tensor's magnitude) wrecks
    the network, so that run must fall back."""
    from micronet_jax.quant.learn import FakeQuantLearning, learn_fake_quant, teacher_fn

    model, variables, images = pruned_tiny()
    bits = BitWidths(4, 8)
    quantized, _ = post_training_quantize(
        model, variables, images[:32], bits, parse_method("nearest"), batch_size=16
    )
    options = FakeQuantLearning(steps=4, batch_size=8, lr=lr, held_out=0.25, augment=False)
    teacher = teacher_fn(model, variables)
    returned, history = learn_fake_quant(model, bits, quantized, teacher, images[:32], options)
    assert len(history) == 4 and history.held_out is not None
    before, after = history.held_out
    assert np.isfinite(before) and before > 0
    assert history.kept == (after < before)
    if lr == 50.0:
        assert after > before and not history.kept
    same = jax.tree_util.tree_all(
        jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), returned, quantized)
    )
    assert same == (not history.kept)
