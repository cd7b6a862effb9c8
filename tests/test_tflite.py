"""LiteRT export: the float32 `.tflite` model is the JAX network; the int8 one is
full-integer (every tensor between its input and its outputs on an 8-bit grid) and keeps
the network's predictions on its own calibration images; the early-exit pair is the whole
model split; bad requests are one line."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from test_ptq import pruned_tiny

tf = pytest.importorskip("tensorflow", reason="the tflite extra (TensorFlow, to convert)")
pytest.importorskip("ai_edge_litert", reason="the export extra (LiteRT, to run)")

from micronet_jax.deploy import onnx_graph  # noqa: E402
from micronet_jax.deploy.bundle import write_tflite_models  # noqa: E402
from micronet_jax.deploy.tflite import Runner, require_tensorflow, to_tflite  # noqa: E402
from micronet_jax.errors import ConfigError  # noqa: E402
from micronet_jax.models.fold import fold_batch_norm  # noqa: E402
from micronet_jax.train.steps import predict  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    model, variables, images = pruned_tiny()
    folder = tmp_path_factory.mktemp("tflite")
    folded = fold_batch_norm(variables)
    write_tflite_models(folder, model, folded, "", None)
    write_tflite_models(folder, model, folded, "_int8", images[:32])
    return folder, model, variables, images


def float_tensors_inside(path) -> tuple[list[str], set[str]]:
    """(the ops that read or write a float32 tensor inside the model, the dtypes at its
    inputs and outputs)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(  # the model's own ops, not XNNPACK's partition of them
        model_path=str(path),
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    interpreter.allocate_tensors()
    boundary = {d["index"] for d in interpreter.get_input_details()}
    boundary |= {d["index"] for d in interpreter.get_output_details()}
    dtype = {d["index"]: np.dtype(d["dtype"]).name for d in interpreter.get_tensor_details()}
    floats = {i for i, name in dtype.items() if name == "float32" and i not in boundary}
    ops = [
        op["op_name"]
        for op in interpreter._get_ops_details()
        if floats & (set(op["inputs"]) | set(op["outputs"]))
    ]
    return ops, {dtype[i] for i in boundary}


@pytest.mark.slow
def test_float_model_is_the_jax_network(models):
    folder, model, variables, images = models
    logits, exit_logits = Runner(folder / "model.tflite")(images)
    reference = predict(model.apply, variables, images, 48)
    np.testing.assert_allclose(logits, reference[0], atol=1e-4)
    np.testing.assert_allclose(exit_logits, reference[1], atol=1e-4)


@pytest.mark.slow
def test_int8_model_is_full_integer_and_keeps_its_predictions(models):
    folder, model, variables, images = models
    float_ops, boundary = float_tensors_inside(folder / "model_int8.tflite")
    # every op computes on 8-bit codes but the first two: the raw pixels cast to float
    # (the network's own first step) and quantised once
    assert sorted(float_ops) == ["CAST", "QUANTIZE"], float_ops
    assert boundary == {"uint8", "float32"}  # raw pixels in, dequantised logits out
    logits, _ = Runner(folder / "model_int8.tflite")(images[:32])  # calibrated on these
    reference, _ = predict(model.apply, variables, images[:32], 32)
    assert np.mean(logits.argmax(-1) == reference.argmax(-1)) >= 0.75


@pytest.mark.slow
def test_early_exit_pair_is_the_whole_model_split(models):
    folder, _, _, images = models
    logits, exit_logits = Runner(folder / "model.tflite")(images)
    head_exit, features = Runner(folder / "early_exit" / "head.tflite")(images)
    (tail_logits,) = Runner(folder / "early_exit" / "tail.tflite")(features[:5])
    np.testing.assert_allclose(head_exit, exit_logits, atol=1e-5)
    np.testing.assert_allclose(tail_logits, logits[:5], atol=1e-5)


def test_one_file_runs_at_every_batch_size(tmp_path):
    """Converted at batch 4, the model runs batches of 1, 3 and 10 (its batch left free),
    each image's logits the same whatever batch it came in."""
    model, variables, images = pruned_tiny()
    forward = onnx_graph.forward_fn(model, fold_batch_norm(variables), target="tflite")
    path = tmp_path / "model.tflite"
    path.write_bytes(to_tflite(forward, (4, 32, 32, 3), np.uint8))
    runner = Runner(path)
    ten, _ = runner(images[:10])
    one, _ = runner(images[:1])
    three, _ = runner(images[7:10])
    assert ten.shape == (10, 10)
    np.testing.assert_allclose(one, ten[:1], atol=1e-5)
    np.testing.assert_allclose(three, ten[7:], atol=1e-5)
    reference, _ = predict(model.apply, variables, images[:10], 10)
    np.testing.assert_allclose(ten, reference, atol=1e-4)


def test_converting_without_tensorflow_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[tflite\]"'):
        require_tensorflow()


@pytest.mark.slow
def test_the_jax_simulation_computes_what_litert_does(models):
    """The model read back from its flatbuffer and run in JAX: the float32 model to float
    rounding, the int8 one on the same grids (LiteRT's integer kernels and the float
    simulation part only where a value lands next to a grid boundary: on this network most
    logits come out identical)."""
    from micronet_jax.deploy import tflite_sim

    folder, _, _, images = models
    float_model = folder / "model.tflite"
    got, simulated = Runner(float_model)(images), tflite_sim.load(float_model)(images)
    for ours, theirs in zip(got, simulated, strict=True):
        np.testing.assert_allclose(ours, np.asarray(theirs), atol=1e-5)
    int8_model = folder / "model_int8.tflite"
    got, simulated = Runner(int8_model)(images), tflite_sim.load(int8_model)(images)
    assert np.mean(got[0].argmax(-1) == np.asarray(simulated[0]).argmax(-1)) >= 0.95
    assert np.median(np.abs(got[0] - np.asarray(simulated[0]))) == 0.0
