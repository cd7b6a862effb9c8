"""The integer network learned as the runtimes run it (`deploy/integer_net.py`,
`deploy/integer_learn.py`, `deploy/tflite_grids.py`), on the tiny network: its JAX twin
computes the integer graph bit for bit, learning moves agreement with float32 up on images
it never saw, and both files carry exactly the learned codes and grids."""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import onnx
import pytest
from test_ptq import pruned_tiny

from micronet_jax.deploy import onnx_sim
from micronet_jax.deploy.bundle import write_integer_graphs
from micronet_jax.deploy.integer_learn import LearnOptions, kl_to_teacher, learn, teacher_fn
from micronet_jax.deploy.integer_net import (
    IntegerNetwork,
    float_params,
    layer_names,
    learned_values,
    reference_kernels,
)
from micronet_jax.evaluation.early_exit import logit_agreement
from micronet_jax.models.fold import fold_batch_norm
from micronet_jax.quant.ptq import parse_method, post_training_quantize
from micronet_jax.quant.widths import BitWidths


def images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)


@functools.cache
def integer_graph(tmp_root: str):
    """The tiny network and its post-training integer graph (rounding to nearest)."""
    from pathlib import Path

    model, variables, calibration = pruned_tiny()
    bits = BitWidths(8, 8, depthwise_channels=False)
    quantized, _ = post_training_quantize(
        model, variables, calibration[:32], bits, parse_method("nearest"), batch_size=16
    )
    folder = Path(tmp_root)
    graphs = write_integer_graphs(
        folder, model, quantized, calibration[:32], ["logits", "exit_logits"]
    )
    return model, variables, graphs


@pytest.fixture(scope="module")
def tiny_integer(tmp_path_factory):
    return integer_graph(str(tmp_path_factory.mktemp("integer")))


def test_the_twin_computes_the_integer_graph_bit_for_bit(tiny_integer):
    """At its start the twin is the file: its outputs are the simulation's exactly (the
    layers' sums exact, one float32 rescale), and writing its parameters back changes no
    value of the graph."""
    _, _, graphs = tiny_integer
    net = IntegerNetwork(graphs["model"])
    params = net.init_params()
    x = images(64, 1)
    ours = net.apply(params, x)
    theirs = onnx_sim.load(graphs["model"])(x)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    written = {t.name: onnx.numpy_helper.to_array(t) for t in net.to_onnx(params).graph.initializer}
    for tensor in graphs["model"].graph.initializer:
        np.testing.assert_array_equal(written[tensor.name], onnx.numpy_helper.to_array(tensor))
    # a control: one grid's step 1.5 times as large changes what the twin computes
    moved = dict(params, steps=dict(params["steps"]))
    root = next(r for r in net.grids if r not in net.fixed)
    moved["steps"][root] = params["steps"][root] * 1.5
    assert any(
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(net.apply(moved, x), ours, strict=True)
    )


@pytest.mark.slow
@pytest.mark.shared
def test_learning_moves_agreement_up_on_held_out_images(original_checkpoints, cifar10_archive):
    """On the released network (the tiny one's random predictions are all one class, which
    no rounding moves), a few dozen learning steps on CIFAR-10 training images bring the
    integer network's predictions nearer the float32 network's on test images it never
    saw: higher agreement, lower KL divergence. Measured on the integer network itself (the
    twin of its file, bit for bit its simulation: the test above), both sides compiled once
    for the 1,000 images."""
    from micronet_jax.data.cifar import load_train_test
    from micronet_jax.models.torch_import import load_original

    loaded = load_original(original_checkpoints / "final_ee50" / "trained_model.pth")
    model, variables = loaded.model, loaded.variables
    train, test = load_train_test("cifar10", str(cifar10_archive), download=False)
    bits = BitWidths(8, 8, depthwise_channels=False)
    calibration = train.images[:128]
    quantized, _ = post_training_quantize(
        model, variables, calibration, bits, parse_method("nearest")
    )
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        graph = write_integer_graphs(
            Path(folder), model, quantized, calibration, ["logits", "exit_logits"]
        )["model"]
    net = IntegerNetwork(graph)
    teacher = teacher_fn(model, variables)
    targets = float_params(net, net.init_params(), fold_batch_norm(variables)["params"])
    params, losses = learn(
        net,
        teacher,
        train.images[:2000],
        LearnOptions(steps=40, batch_size=16),
        float_params=targets,
    )
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    held_out = test.images[:1000]
    reference = tuple(np.asarray(t) for t in jax.jit(teacher)(held_out))
    integer = jax.jit(net.apply)
    before = tuple(np.asarray(t) for t in integer(net.init_params(), held_out))
    after = tuple(np.asarray(t) for t in integer(params, held_out))
    assert float(kl_to_teacher(after, reference)) < 0.9 * float(kl_to_teacher(before, reference))
    agree_before = logit_agreement(before, reference)
    agree_after = logit_agreement(after, reference)
    print(agree_before, agree_after)
    assert agree_after["main"] > agree_before["main"]
    assert agree_after["exit"] > agree_before["exit"]


@pytest.mark.slow
def test_export_learns_and_both_files_hold_the_learned_values(
    tiny_pipeline, tiny_archive, tmp_path
):
    """`export --bits=8x8 --format=onnx,tflite` learns the integer network and writes it
    into model_int8.onnx, model_int8.tflite and both exit pairs: every grid, kernel code,
    kernel scale and bias code read back from each file equals the JAX side's, and each
    runtime predicts what its file's JAX simulation predicts."""
    from test_export import export_command, session

    from micronet_jax.deploy import tflite_grids, tflite_sim
    from micronet_jax.deploy.bundle import load_network
    from micronet_jax.deploy.tflite import Runner

    _, workdir, _ = tiny_pipeline
    out = tmp_path / "export"
    done = export_command(
        f"--checkpoint={workdir}",
        f"--out={out}",
        "--bits=8x8",
        f"--calibration={tiny_archive}",
        "--num_calibration=64",
        "--method=nearest",
        "--learn_steps=20",
        "--format=onnx,tflite",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    card = json.loads((out / "card.json").read_text())
    learning = card["quantized"]["learning"]
    assert learning["steps"] == 20 and learning["images"] == 160
    # read back here, outside the export: the ONNX file's values are the LiteRT files'
    model, variables, _ = load_network(workdir)
    reference = reference_kernels(fold_batch_norm(variables)["params"])
    net = IntegerNetwork(onnx.load(out / "model_int8.onnx"))
    grids, layers, _, input_keys = learned_values(
        net, net.init_params(), layer_names(net, reference)
    )
    for path in ("model_int8.tflite", "early_exit/head_int8.tflite", "early_exit/tail_int8.tflite"):
        data = (out / path).read_bytes()
        file_grids, file_layers = tflite_grids.read_back(data, reference, input_keys)
        found = {k: v for k, v in file_grids.items() if k in grids}
        assert len(found) >= len(file_grids) - 1  # all but the raw pixels' (tail: features')
        for key, (step, zero) in found.items():
            assert (step, zero) == grids[key], key
        assert file_layers.keys() <= layers.keys() and file_layers
        for name, (codes, scales, bias) in file_layers.items():
            np.testing.assert_array_equal(codes, layers[name][0])
            np.testing.assert_allclose(scales, layers[name][1], rtol=1e-6)
            if bias is not None:
                np.testing.assert_array_equal(bias[0], layers[name][2][0])
    for checks in (card["tflite"]["int8"]["values_equal_to_jax"].values(),):
        for check in checks:
            assert check["grids_equal"] >= check["grids"] - 1
            assert check["layers_equal"] == check["layers"]
    # each runtime computes its file: the integer sums exact on both sides
    from micronet_jax.data.cifar import load_train_test

    _, test_split = load_train_test("cifar10", str(tiny_archive), download=False)
    x = test_split.images
    got = session(out / "model_int8.onnx").run(None, {"images": x})
    simulated = onnx_sim.load(onnx.load(out / "model_int8.onnx"))(x)
    assert np.mean(got[0].argmax(-1) == np.asarray(simulated[0]).argmax(-1)) >= 0.95
    litert = Runner(out / "model_int8.tflite")(x)
    litert_simulated = tflite_sim.load(out / "model_int8.tflite")(x)
    assert np.mean(litert[0].argmax(-1) == np.asarray(litert_simulated[0]).argmax(-1)) >= 0.95
