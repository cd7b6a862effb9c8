"""ONNX export: the float32 graph is the JAX network, the int8 graph carries the project's own
codes and grids as int8 initializers and QDQ nodes, and the command refuses bad input in one
line without leaving anything behind."""

from __future__ import annotations

import collections
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_ptq import pruned_tiny
from tiny_run import user_env

from micronet_jax.deploy import onnx_graph
from micronet_jax.deploy.bundle import run_onnx, write_graphs
from micronet_jax.deploy.onnxruntime_session import file_sha256
from micronet_jax.models.fold import fold_batch_norm
from micronet_jax.quant.fake import QuantizedApply, scale_key
from micronet_jax.quant.ptq import parse_method, post_training_quantize
from micronet_jax.quant.widths import BitWidths
from micronet_jax.train.steps import predict

onnx = pytest.importorskip("onnx", reason="the export extra (onnx, onnxruntime, jax2onnx)")
ort = pytest.importorskip("onnxruntime", reason="the export extra")


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@functools.cache
def exported(tmp_root: str, bits_text: str | None):
    """The tiny pruned network's graphs (and its quantised variables) in a folder."""

    model, variables, images = pruned_tiny()
    folder = Path(tmp_root) / (bits_text or "float")
    folder.mkdir()
    if bits_text is None:
        write_graphs(folder, model, fold_batch_norm(variables), None, "", ["logits", "exit_logits"])
        return folder, model, fold_batch_norm(variables)
    weights, activations = (int(b) for b in bits_text.split("x"))
    bits = BitWidths(weights, activations)
    quantized, _ = post_training_quantize(
        model, variables, images[:32], bits, parse_method("nearest"), batch_size=16
    )
    write_graphs(folder, model, quantized, bits, "_int8", ["logits", "exit_logits"])
    return folder, model, quantized


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("onnx"))


@pytest.mark.slow
def test_float_graph_takes_raw_images_and_equals_the_jax_network(root):
    folder, model, _ = exported(root, None)
    _, variables, images = pruned_tiny()
    proto = onnx.load(folder / "model.onnx")
    assert proto.opset_import[0].version >= 17
    (image_input,) = proto.graph.input
    dims = [d.dim_param or d.dim_value for d in image_input.type.tensor_type.shape.dim]
    assert (image_input.name, image_input.type.tensor_type.elem_type, dims) == (
        "images",
        onnx.TensorProto.UINT8,
        ["N", 32, 32, 3],
    )
    assert [o.name for o in proto.graph.output] == ["logits", "exit_logits"]
    logits, exit_logits = session(folder / "model.onnx").run(None, {"images": images})
    reference = predict(model.apply, variables, images, 48)  # BN as trained, not folded
    np.testing.assert_allclose(logits, reference[0], atol=1e-4)
    np.testing.assert_allclose(exit_logits, reference[1], atol=1e-4)


def op_histogram(proto) -> dict[str, int]:
    return dict(collections.Counter(node.op_type for node in proto.graph.node))


@pytest.mark.slow
def test_float_graph_is_one_node_per_operation_in_one_layout(root):
    """The deployment graph of the tiny network (stem, 3 blocks with squeeze-excite, head,
    exit head): every conv a Conv with its batch norm folded in and its padding in `pads`,
    each swish a Sigmoid and a Mul, each spatial mean a GlobalAveragePool, each classifier one
    Gemm with its bias; one Transpose, from the input's NHWC to NCHW; no Concat, Reshape,
    Expand, Dropout, Sqrt, and nothing outside the standard ONNX domain."""
    folder, model, _ = exported(root, None)
    proto = onnx.load(folder / "model.onnx")
    convs = 1 + (2 + 3 + 3) + (2 + 2 + 2) + 1 + 2  # stem, block convs, SE pairs, head, exit
    swishes = convs - 3 - 3 + 3 - 2  # every conv but project / SE expand / fc, plus SE's own
    histogram = op_histogram(proto)
    assert histogram.pop("Conv") == convs
    assert histogram.pop("GlobalAveragePool") == 3 + 1 + 1  # each SE, the head, the exit head
    assert histogram.pop("Gemm") == 2 and histogram.pop("Flatten") == 2
    assert histogram.pop("Transpose") == 1
    assert histogram.pop("Sigmoid") >= swishes and histogram.pop("Mul") >= swishes
    assert set(histogram) <= {"Cast", "Div", "Sub", "Gather", "Add"}, histogram
    assert histogram.get("Gather", 0) <= 2 and histogram.get("Add", 0) <= 3
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    head = onnx.load(folder / "early_exit" / "head.onnx")
    tail = onnx.load(folder / "early_exit" / "tail.onnx")
    assert op_histogram(head).get("Transpose") == 1  # the input's; features leave in NCHW
    assert "Transpose" not in op_histogram(tail)  # and enter in NCHW
    for part in (head, tail):
        assert not {"Concat", "Reshape", "Expand"} & set(op_histogram(part))


@pytest.mark.slow
def test_early_exit_pair_is_the_whole_graph_split(root):
    folder, *_ = exported(root, None)
    images = pruned_tiny()[2]
    logits, exit_logits = session(folder / "model.onnx").run(None, {"images": images})
    head_exit, features = session(folder / "early_exit" / "head.onnx").run(None, {"images": images})
    (tail_logits,) = session(folder / "early_exit" / "tail.onnx").run(
        None, {"features": features[:5]}
    )
    np.testing.assert_allclose(head_exit, exit_logits, atol=1e-5)
    np.testing.assert_allclose(tail_logits, logits[:5], atol=1e-5)


def kernel_codes(proto) -> list[np.ndarray]:
    """The int8 codes each Conv / Gemm reads its kernel from (through a DequantizeLinear)."""
    made_by = {out: node for node in proto.graph.node for out in node.output}
    constants = {t.name: t for t in proto.graph.initializer}
    codes = []
    for node in proto.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            dequantize = made_by[node.input[1]]
            assert dequantize.op_type == "DequantizeLinear"
            codes.append(onnx.numpy_helper.to_array(constants[dequantize.input[0]]))
    return codes


def weights_of(proto, op_type: str) -> int:
    return sum(node.op_type == op_type for node in proto.graph.node)


def optimised_op_types(path, optimised) -> collections.Counter:
    """The op types of the graph onnxruntime runs for `path` (its own optimised model)."""
    options = ort.SessionOptions()
    optimised.parent.mkdir(parents=True, exist_ok=True)
    options.optimized_model_filepath = str(optimised)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(node.op_type for node in onnx.load(optimised).graph.node)


def int8_codes(proto) -> list[np.ndarray]:
    return [
        onnx.numpy_helper.to_array(t)
        for t in proto.graph.initializer
        if t.data_type == onnx.TensorProto.INT8
    ]


@pytest.mark.slow
def test_weights_only_int8_graph_stores_the_codes_and_is_exact(root):
    folder, model, quantized = exported(root, "8x32")
    proto = onnx.load(folder / "model_int8.onnx")
    codes = int8_codes(proto)
    kernels = {k: v for k, v in quantized["weight_scales"].items()}
    assert len(codes) == len(kernels)
    ours = sorted(
        np.sort(np.rint(np.asarray(_kernel(quantized, key)) / np.asarray(scale)).ravel())
        .astype(np.int8)
        .tobytes()
        for key, scale in kernels.items()
    )
    assert sorted(np.sort(c.ravel()).tobytes() for c in codes) == ours
    ops = {n.op_type for n in proto.graph.node}
    assert "DequantizeLinear" in ops and "QuantizeLinear" not in ops
    images = pruned_tiny()[2]
    logits, _ = session(folder / "model_int8.onnx").run(None, {"images": images})
    jax_logits, _ = predict(QuantizedApply(model, BitWidths(8, 32)), quantized, images, 48)
    np.testing.assert_allclose(logits, jax_logits, atol=1e-4)


def _kernel(variables, key):
    node = variables["params"]
    for part in key.split("."):
        node = node[part]
    return node["kernel"]


@pytest.mark.slow
def test_int8_graph_quantises_every_layer_input_as_jax_does(root):
    folder, model, quantized = exported(root, "8x8")
    proto = onnx.load(folder / "model_int8.onnx")
    # one grid per layer input (cleaning may give a grid read by two branches a
    # QuantizeLinear on each: the same scale and zero point)
    grids = {tuple(n.input[1:]) for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    assert len(grids) == len(quantized["quant"])
    dequantized = {tuple(n.input[1:]) for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    assert len(dequantized) == len(quantized["quant"]) + len(quantized["weight_scales"])
    zero_points = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.UINT8]
    assert len(zero_points) == len(quantized["quant"])
    images = pruned_tiny()[2]
    logits, exit_logits = session(folder / "model_int8.onnx").run(None, {"images": images})
    jax_logits, jax_exit = predict(QuantizedApply(model, BitWidths(8, 8)), quantized, images, 48)
    assert np.mean(logits.argmax(-1) == jax_logits.argmax(-1)) >= 0.95
    assert np.median(np.abs(logits - jax_logits)) < 1e-4  # most logits agree to float noise
    assert scale_key("stem_conv/kernel") in quantized["quant"]


# --- the command ------------------------------------------------------------------------------


def export_command(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "micronet_jax.export", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def bad_inputs(tmp_path, archive):
    garbage = tmp_path / "not_a_micronet.pth"
    garbage.write_bytes(b"PK\x03\x04 this is not a torch checkpoint")
    truncated = tmp_path / "cifar-10-python.tar.gz"
    truncated.write_bytes(archive.read_bytes()[:5000])
    existing = tmp_path / "existing"
    existing.mkdir()
    return {
        "not a MicroNet": ([f"--checkpoint={garbage}"], "not_a_micronet.pth"),
        "bits out of range": ([f"--checkpoint={garbage}", "--bits=9x8"], "--bits"),
        "bits not WxA": ([f"--checkpoint={garbage}", "--bits=int8"], "--bits"),
        "bits without calibration": ([f"--checkpoint={garbage}", "--bits=8x8"], "--calibration"),
        "calibration missing": (
            [f"--checkpoint={garbage}", "--bits=8x8", f"--calibration={tmp_path}/none.tar.gz"],
            "none.tar.gz",
        ),
        "calibration malformed": (
            [f"--checkpoint={garbage}", "--bits=8x8", f"--calibration={truncated}"],
            "cifar-10-python.tar.gz",
        ),
        "output exists": ([f"--checkpoint={garbage}", f"--out={existing}"], "--overwrite"),
        "unknown format": ([f"--checkpoint={garbage}", "--format=onnx,coreml"], "coreml"),
        "negative learning steps": (
            [f"--checkpoint={garbage}", "--learn_steps=-1"],
            "--learn_steps",
        ),
        "tflite below 8 bits": (
            [
                f"--checkpoint={garbage}",
                "--format=tflite",
                "--bits=6x6",
                f"--calibration={archive}",
            ],
            "--bits 6x6",
        ),
    }


CASES = (
    "not a MicroNet",
    "negative learning steps",
    "bits out of range",
    "bits not WxA",
    "bits without calibration",
    "calibration missing",
    "calibration malformed",
    "output exists",
    "unknown format",
    "tflite below 8 bits",
)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, tmp_path, tiny_archive, capsys):
    from micronet_jax.export import main

    args, named = bad_inputs(tmp_path, tiny_archive)[case]
    out = tmp_path / "out"
    if not any(a.startswith("--out=") for a in args):
        args = [*args, f"--out={out}"]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines
    assert not captured.out
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing new, nothing partial


def test_the_grids_convert_to_quantize_dequantize_nodes_that_compute_the_same(tmp_path):
    """One kernel (int8 codes, a scale per output channel) and one input (uint8, per
    channel, fewer levels than 256): onnxruntime computes what the fake quantisation does."""
    import jax.numpy as jnp

    from micronet_jax.quant.fake import FAKE_QUANT, activation_grid

    rng = np.random.default_rng(0)
    kernel = jnp.asarray(rng.normal(size=(6, 4)).astype(np.float32))
    scale = jnp.max(jnp.abs(kernel), axis=0) / 127
    bounds = jnp.asarray(
        np.stack([[-0.3, -1.0, 0.0, -2.0, -0.1, -0.5], [2.0, 1.0, 3.0, 0.5, 1.0, 4.0]]), jnp.float32
    )
    step, zero = activation_grid(bounds, 6)

    def network(ops):
        def forward(x):
            return ops.activation(x, step, zero, 6, False) @ ops.weight(kernel, scale, 8, False)

        return forward

    x = rng.normal(size=(50, 6)).astype(np.float32) * 2
    proto = onnx_graph.to_onnx(network(onnx_graph.OnnxGrids()), ("N", 6), np.float32, ["y"])
    ops = sorted(n.op_type for n in proto.graph.node)
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 2
    assert [t.data_type for t in proto.graph.initializer].count(onnx.TensorProto.INT8) == 1
    path = tmp_path / "grids.onnx"
    onnx.save(proto, path)
    (got,) = session(path).run(None, {"images": x})
    expected = np.asarray(network(FAKE_QUANT)(jnp.asarray(x)))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_export_of_a_finished_run_writes_both_graphs_and_the_card(
    tiny_pipeline, tiny_archive, tmp_path
):
    _, workdir, _ = tiny_pipeline
    out = tmp_path / "export"
    result = export_command(
        f"--checkpoint={workdir}",
        f"--out={out}",
        "--bits=8x8",
        f"--calibration={tiny_archive}",
        "--num_calibration=64",
        "--method=mse+adaround+bias",
        "--learn_steps=5",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    card = json.loads((out / "card.json").read_text())
    assert set(card["files"]) >= {"model.onnx", "model_int8.onnx"}
    # every kernel weight of the float32 graph is an int8 code in the int8 one (the tiny
    # network's per-channel scales and zero points make its file no smaller)
    float_graph, int8_graph = (onnx.load(out / name) for name in ("model.onnx", "model_int8.onnx"))
    weights = {n.input[1] for n in float_graph.graph.node if n.op_type in ("Conv", "Gemm")}
    kernels = sum(int(np.prod(t.dims)) for t in float_graph.graph.initializer if t.name in weights)
    assert sum(c.size for c in kernel_codes(int8_graph)) == kernels
    quantized = card["quantized"]
    assert quantized["method"] == "mse+adaround+bias" and quantized["bits"] == "8x8"
    assert quantized["calibration"]["images"] == 64
    assert quantized["graph"].startswith("integer")
    assert "depthwise inputs per tensor" in quantized["widths"]
    # the runtime's parity with the file's simulation, measured here (not read from the card
    # the export wrote), and the card says the same
    from micronet_jax.data.cifar import load_train_test
    from micronet_jax.deploy import onnx_sim

    _, test = load_train_test("cifar10", str(tiny_archive), download=False)
    got = session(out / "model_int8.onnx").run(None, {"images": test.images})
    simulated = onnx_sim.load(onnx.load(out / "model_int8.onnx"))(test.images)
    parity = np.mean(got[0].argmax(-1) == np.asarray(simulated[0]).argmax(-1))
    assert parity >= 0.9
    assert quantized["onnx_vs_jax_simulation"]["main"] == pytest.approx(parity)
    # onnxruntime runs it on integer kernels: no float Conv is left in what it runs
    optimised = optimised_op_types(out / "model_int8.onnx", tmp_path / "ort" / "optimised.onnx")
    assert "Conv" not in optimised
    assert optimised["QLinearConv"] == weights_of(float_graph, "Conv")
    # counted at the widths exported (the tiny network's per-channel scales can outweigh
    # what 8-bit kernels save: the released network's test compares the bytes)
    assert (
        "8-bit" in quantized["score"]["widths"] and "16-bit" in card["float32"]["score"]["widths"]
    )
    assert quantized["score"]["total"] > 0
    assert card["float32"]["onnx_vs_jax"]["max_logit_difference"] < 1e-4
    assert sorted(p.name for p in out.parent.iterdir()) == ["export", "ort"]  # nothing partial


@pytest.mark.slow
@pytest.mark.shared
def test_released_network_exports_and_every_runtime_computes_what_jax_does(
    original_checkpoints, cifar10_archive, tmp_path, compile_cache
):
    """The acceptance run on the original's final network, from the command line, ONNX and
    LiteRT (rounding to nearest, to keep the test short; the rounding method does not change
    what the graphs compute), on 500 real test images: the float32 files' logits within 1e-4
    of JAX in onnxruntime, OpenVINO (f32) and LiteRT; the int8 files smaller, holding the
    codes, their predictions those of their own JAX simulations (up to the grid boundaries
    the runtimes' integer arithmetic lands on differently; see docs/deployment.md), OpenVINO
    running the same integer graph."""
    from micronet_jax.data.cifar import load_train_test
    from micronet_jax.deploy import onnx_sim, openvino_runtime
    from micronet_jax.deploy.tflite import Runner
    from micronet_jax.evaluation.early_exit import logit_agreement
    from micronet_jax.models.torch_import import load_original

    pth = original_checkpoints / "final_ee50" / "trained_model.pth"
    out = tmp_path / "export"
    done = export_command(
        f"--checkpoint={pth}",
        f"--out={out}",
        "--bits=8x8",
        f"--calibration={cifar10_archive}",
        "--num_calibration=128",
        "--num_test=500",
        "--num_control=0",
        "--method=nearest",
        "--learn_steps=1",
        "--num_learn=64",
        "--format=onnx,tflite",
        env=user_env(compile_cache),
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    card = json.loads(done.stdout)
    assert json.loads((out / "card.json").read_text()) == json.loads(json.dumps(card))
    assert card["measured_on"]["test_images"] == 500
    assert card["float32"]["onnx_vs_jax"]["max_logit_difference"] < 1e-4
    # and, outside the export's own code, in every runtime
    _, test = load_train_test("cifar10", str(cifar10_archive), download=False)
    images = test.images[:500]
    loaded = load_original(pth)
    reference = predict(loaded.model.apply, loaded.variables, images, 500)
    config = {"INFERENCE_NUM_THREADS": 2, "INFERENCE_PRECISION_HINT": "f32"}
    openvino = openvino_runtime.compile_model(out / "model.onnx", config)
    for got in (
        run_onnx(session(out / "model.onnx"), images),
        tuple(openvino.create_infer_request().infer({0: images}).values()),
        Runner(out / "model.tflite")(images),
    ):
        for ours, theirs in zip(got, reference, strict=True):
            assert np.max(np.abs(ours - theirs)) < 1e-4
    assert card["files"]["model_int8.onnx"] < 0.4 * card["files"]["model.onnx"]
    assert card["files"]["model_int8.tflite"] < 0.45 * card["files"]["model.tflite"]
    # 8-bit kernels with their scales store less than the 16-bit freebie (the math score
    # rises: below 16 bits additions count at 32)
    assert card["quantized"]["score"]["param"] < card["float32"]["score"]["param"]
    # the layers' sums exact on both sides: what is left is the other ops' rounding. In
    # onnxruntime nothing is left here (the whole file, learned or not, 99.99% on 10,000
    # images). In LiteRT every op but one gives the simulation's codes exactly, op by op on
    # the runtime's own inputs: the spatial SUM of each squeeze-excite mean (its int8
    # requantisation is XNNPACK's own fixed point), 35 of 194,048 codes one step off on 64
    # images of this file, and each such code moves a whole channel's gate. So near ties
    # move: 98.2% of these 500 images, 99.91% of 10,000 for the fully learned file, every
    # confident prediction in both.
    onnx_parity = card["quantized"]["onnx_vs_jax_simulation"]
    litert_parity = card["tflite"]["int8"]["litert_vs_jax_simulation"]
    assert onnx_parity["confident"] == litert_parity["confident"] == 1.0
    assert onnx_parity["main"] >= 0.99 and litert_parity["main"] >= 0.97
    for check in card["tflite"]["int8"]["values_equal_to_jax"].values():
        assert check["layers_equal"] == check["layers"]
    # OpenVINO runs the same integer graph, but its requantisation is its own (dequantise,
    # then its FakeQuantize formula with the kernels it picks for the CPU), not ONNX's exact
    # round((sum + bias) · scale): a code at a grid boundary lands one step off, and the
    # flips compound through ~160 requantisations. Which flip depends on the CPU's kernels
    # (87.6% of 500 images on a Xeon with AMX, 90.6% here, 89.2% here with only the fusion
    # changed), so all images have no floor; the predictions the network is sure of do not
    # move (all of them here, 98.9% even with every float layer in bf16), and a
    # broken integer kernel moves everything (39% with oneDNN's ISA capped below VNNI).
    simulated = onnx_sim.load(onnx.load(out / "model_int8.onnx"))(images)
    integer = openvino_runtime.compile_model(out / "model_int8.onnx", config)
    got = list(integer.create_infer_request().infer({0: images}).values())
    openvino_parity = logit_agreement(tuple(got), tuple(np.asarray(s) for s in simulated))
    assert openvino_parity["confident"] >= 0.98
    assert openvino_parity["main"] >= 0.75
    assert card["source"]["sha256"] == file_sha256([pth])
    # the per-operator profile of these files runs (its figures: benchmarks/RESULTS.md)
    profile = subprocess.run(
        [sys.executable, "-m", "benchmarks.deploy_profile", f"--onnx_dir={out}", "--batch=4",
         "--runs=1"],
        env=user_env(compile_cache), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert profile.returncode == 0, profile.stderr[-3000:]
    for name in ("model.onnx", "model_int8.onnx"):
        assert f"onnxruntime {name}, batch 4" in profile.stdout
        assert f"OpenVINO {name}, batch 4" in profile.stdout


def test_the_quantize_static_peer_quantises_each_kernel_per_output_channel(tmp_path):
    """onnxruntime's own quantiser, the peer in experiments.ptq and benchmarks.deploy, sees
    each conv kernel as a constant (jax2onnx's kernel transposes folded) and so gives it int8
    codes with a scale per output channel; the peer then stays close to its float graph."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 4, 6)).astype(np.float32))
    dense = jnp.asarray(rng.normal(size=(6 * 8 * 8, 5)).astype(np.float32) * 0.05)

    def forward(x):
        y = jax.lax.conv_general_dilated(
            x, kernel, (1, 1), "SAME", None, None, ("NHWC", "HWIO", "NHWC")
        )
        return jax.nn.relu(y).reshape(x.shape[0], -1) @ dense + 0.1

    x = rng.normal(size=(64, 8, 8, 4)).astype(np.float32)
    float_path, peer_path = tmp_path / "float.onnx", tmp_path / "peer.onnx"
    onnx.save(onnx_graph.to_onnx(forward, ("N", 8, 8, 4), np.float32, ["y"]), float_path)
    onnx_graph.static_quantize_peer(str(float_path), str(peer_path), x[:32])
    peer = onnx.load(peer_path)
    initializers = {t.name: t for t in peer.graph.initializer}
    made_by = {o: n for n in peer.graph.node for o in n.output}
    (conv,) = [n for n in peer.graph.node if n.op_type == "Conv"]
    dequantize = made_by[conv.input[1]]
    assert dequantize.op_type == "DequantizeLinear"
    codes, scales = initializers[dequantize.input[0]], initializers[dequantize.input[1]]
    assert codes.data_type == onnx.TensorProto.INT8 and list(codes.dims) == [6, 4, 3, 3]
    assert list(scales.dims) == [6]
    (want,) = session(float_path).run(None, {"images": x})
    (got,) = session(peer_path).run(None, {"images": x})
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.99


@pytest.mark.slow
def test_the_integer_graph_runs_on_integer_kernels_and_its_simulation_agrees(tmp_path):
    """At 8x8 the int8 graph puts every tensor an integer kernel touches on a grid, so that
    onnxruntime runs each conv, swish half, squeeze-excite mean, residual sum and classifier
    on its QLinear kernels; the JAX simulation of the same graph (`onnx_sim`) predicts what
    onnxruntime predicts; the early-exit pair is the whole graph split."""
    from micronet_jax.deploy import onnx_sim
    from micronet_jax.deploy.bundle import write_integer_graphs

    model, variables, images = pruned_tiny()
    bits = BitWidths(8, 8, depthwise_channels=False)
    quantized, _ = post_training_quantize(
        model, variables, images[:32], bits, parse_method("nearest"), batch_size=16
    )
    graphs = write_integer_graphs(
        tmp_path, model, quantized, images[:32], ["logits", "exit_logits"]
    )
    optimised = optimised_op_types(tmp_path / "model_int8.onnx", tmp_path / "ort" / "opt.onnx")
    assert "Conv" not in optimised and "Sigmoid" not in optimised
    assert optimised["QLinearConv"] == weights_of(graphs["model"], "Conv")
    assert optimised["QGemm"] == 2 and optimised["QLinearSigmoid"] > 0
    assert optimised["QLinearMul"] > 0 and optimised["QLinearGlobalAveragePool"] > 0
    got = session(tmp_path / "model_int8.onnx").run(None, {"images": images})
    simulated = onnx_sim.load(graphs["model"])(images)
    assert np.mean(got[0].argmax(-1) == np.asarray(simulated[0]).argmax(-1)) >= 0.98
    exit_logits, features = session(tmp_path / "early_exit" / "head_int8.onnx").run(
        None, {"images": images}
    )
    (logits,) = session(tmp_path / "early_exit" / "tail_int8.onnx").run(
        None, {"features": features}
    )
    assert np.mean(exit_logits.argmax(-1) == got[1].argmax(-1)) >= 0.95
    assert np.mean(logits.argmax(-1) == got[0].argmax(-1)) >= 0.9


def require_openvino() -> None:
    """Skips without OpenVINO (the bench extra). Not `pytest.importorskip`: a plain import
    forks this test process (see the test below); the tests import it the project's way."""
    import importlib.util

    if importlib.util.find_spec("openvino") is None:
        pytest.skip("openvino is not installed (the bench extra)")


FORK_COUNT = """
import os, socket, sys
LOCAL = ("127.0.0.1", "::1", "localhost")
_connect, _resolve = socket.socket.connect, socket.getaddrinfo
def connect(self, address):  # the telemetry's event goes nowhere: no test reaches out
    if isinstance(address, tuple) and address[0] not in LOCAL:
        raise OSError("no network from a test")
    return _connect(self, address)
def resolve(host, *args, **kwargs):
    if host not in LOCAL:
        raise socket.gaierror("no network from a test")
    return _resolve(host, *args, **kwargs)
socket.socket.connect, socket.getaddrinfo = connect, resolve
forks = []
fork = os.fork
os.fork = lambda: forks.append(1) or fork()
import jax  # multithreaded, as every process of this project is
if sys.argv[1] == "project":
    from micronet_jax.deploy.openvino_runtime import import_openvino
    import_openvino()
else:
    import openvino
import openvino_telemetry
openvino_telemetry.Telemetry().force_shutdown(10.0)  # waits for the event to be sent
print(len(forks), "CI" in os.environ)
"""


def test_openvino_is_imported_without_forking_this_process():
    """A plain `import openvino` forks the process to send a usage event (unless this
    machine's user opted out of OpenVINO's telemetry); the project's import does not, and
    leaves the environment as it was. The children refuse every connection and name lookup
    beyond this machine, so the plain import's event is sent nowhere."""
    require_openvino()  # both imports happen in the children
    counts = {}
    for how in ("plain", "project"):
        env = {k: v for k, v in os.environ.items() if k != "CI"}
        result = subprocess.run(
            [sys.executable, "-c", FORK_COUNT, how], env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr[-2000:]
        counts[how] = result.stdout.split()
    assert counts["project"] == ["0", "False"]
    opted_out = (Path.home() / "intel" / "openvino_telemetry").exists()
    assert opted_out or counts["plain"][0] != "0"  # the control: the count sees the fork


SIGNAL_AFTER_TWO_CORES = """
import os, signal, sys, gc
import onnx
from onnx import TensorProto, helper
from micronet_jax.deploy import openvino_runtime

path = sys.argv[2]
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
if sys.argv[1] == "plain":
    ov = openvino_runtime.import_openvino()
    models = [ov.Core().compile_model(path, "CPU") for _ in range(2)]
else:
    models = [openvino_runtime.compile_model(path) for _ in range(2)]
while models:
    del models[0]  # released in the order they were made
    gc.collect()
signal.signal(signal.SIGTERM, lambda signum, frame: print("handled", signum, flush=True))
os.kill(os.getpid(), signal.SIGTERM)
print("alive", flush=True)
"""


def test_openvino_leaves_a_process_that_can_still_take_a_signal(tmp_path):
    """Two OpenVINO cores released in the order they were made leave the thread's alternate
    signal stack unmapped: the next SIGTERM (a Ctrl-C, a scheduler's stop) is a segmentation
    fault (the control). Compiled through the project's one core, the same process takes the
    signal in its Python handler and carries on."""
    require_openvino()
    import signal

    outcome = {}
    for how in ("plain", "project"):
        outcome[how] = subprocess.run(
            [sys.executable, "-c", SIGNAL_AFTER_TWO_CORES, how, str(tmp_path / f"{how}.onnx")],
            capture_output=True,
            text=True,
            timeout=300,
        )
    project = outcome["project"]
    assert project.returncode == 0, project.stderr[-2000:]
    assert project.stdout.split() == ["handled", str(int(signal.SIGTERM)), "alive"]
    assert outcome["plain"].returncode == -signal.SIGSEGV, (
        "OpenVINO no longer leaves an unmapped signal stack behind: "
        "openvino_runtime.core() may no longer be needed"
    )


def test_the_project_core_keeps_the_callers_signal_stack():
    """Loading the CPU plugin through `openvino_runtime.core()` leaves the calling thread's
    alternate signal stack where it was (a plain core replaces it with its own)."""
    require_openvino()
    from micronet_jax.deploy import openvino_runtime

    openvino_runtime.core.cache_clear()  # a new core: its plugin loads again
    before = openvino_runtime.alternate_signal_stack()
    openvino_runtime.core()
    assert openvino_runtime.alternate_signal_stack() == before
