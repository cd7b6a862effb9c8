"""The integer graph: the quantised network in the QDQ pattern onnxruntime runs on integer
kernels.

onnxruntime turns `DequantizeLinear → op → QuantizeLinear` into the op's integer kernel
(QLinearConv with VNNI, QLinearMul, QLinearSigmoid, QLinearAdd, QLinearGlobalAveragePool,
QGemm) only where the op's output is requantised at once. The fake quantisation that
defines the score puts grids on the layers' inputs alone, so its graph leaves float convs
on dequantised weights. This graph is built from the deployment graph of the quantised
network (`onnx_clean.clean`, BN folded, kernels on their grids) by putting a grid on every
tensor an integer kernel reads or writes:

- every conv and dense layer's input on the project's own grid (from post-training
  quantisation, one grid per tensor: `--bits=8x8/tensor`), its kernel as the project's int8
  codes with one scale per output channel, its bias as int32 on the product of the two;
- every sigmoid output on the grid LiteRT fixes for it (step 1/256, zero point 0: the
  int8 model's -128 on uint8 codes), so that one set of grids serves both runtimes;
- every other output of a conv, dense layer, product, sum or spatial mean on a grid of its
  own, calibrated like the layers' inputs (the clip of least expected squared error on the
  calibration images, `quant.fake.mse_range`).

A tensor that only moves values (Transpose, Gather, Flatten, Reshape: the input's
upsampling, the flatten before a classifier) shares the grid of the tensor it moves, so a
value is rounded once however many nodes carry it (`grid_roots`). `integer_net` is the
trainable twin of this graph: it learns every code and grid here and writes them back.

The JAX side of its parity is this graph itself (`onnx_sim`), not `QuantizedApply`: the
extra requantisation points make it a different function from the fake quantisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from micronet_jax.deploy.onnx_clean import Graph, _drop_unused_initializers
from micronet_jax.models.paths import path_name

LAYERS = ("Conv", "Gemm")
REQUANTISED = ("Conv", "Gemm", "Sigmoid", "Mul", "Add", "GlobalAveragePool")
QDQ = ("QuantizeLinear", "DequantizeLinear")
PASS_THROUGH = ("Transpose", "Gather", "Flatten", "Reshape")  # move values, compute none
SIGMOID_GRID = (np.float32(1 / 256), np.uint8(0))  # LiteRT's fixed LOGISTIC output grid
HISTOGRAM_BINS = 2048


def integer_graph(
    model: Any,
    params: dict,
    weight_scales: dict,
    input_ranges: dict,
    calibration: Sequence[np.ndarray],
) -> Any:
    """The integer graph of `model` (the cleaned float graph of the quantised network):
    `params` its quantised parameters, `weight_scales` / `input_ranges` the post-training
    quantisation's (keyed by `quant.fake.scale_key`), `calibration` batches of uint8 images
    for the grids of its own."""
    import onnx
    from onnx import helper

    from micronet_jax.quant.fake import activation_grid, scale_key

    graph = Graph(model)
    _constants_on_grids(graph)
    layers = _match_layers(graph, params)
    grids: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for node in graph.graph.node:
        if id(node) in layers:
            bounds = np.asarray(input_ranges[scale_key(layers[id(node)])], np.float32)
            if bounds.ndim != 1:
                raise ValueError(
                    f"{layers[id(node)]}: the integer graph needs one input grid per tensor "
                    "(post-training quantise with --bits=WxA/tensor)"
                )
            step, zero = activation_grid(bounds, 8)
            grids[node.input[0]] = (np.float32(step), np.uint8(zero))
    roots = grid_roots(graph.graph.node)
    for name in list(grids):  # the moved tensor's grid is its source's too
        if roots.get(name, name) != name and roots[name] in graph.producer:
            grids[roots[name]] = grids[name]
    for node in graph.graph.node:
        if node.op_type == "Sigmoid":
            grids[node.output[0]] = SIGMOID_GRID
    own = [
        node.output[0]
        for node in graph.graph.node
        if node.op_type in REQUANTISED and node.output[0] not in grids
    ]
    grids.update(calibrated_grids(model, own, calibration))
    _quantise_weights(graph, layers, params, weight_scales, grids)
    _insert_qdq(graph, grids)
    graph.commit()
    _drop_unused_initializers(model)
    del model.graph.value_info[:]
    result = helper.make_model(model.graph, opset_imports=model.opset_import)
    onnx.checker.check_model(result)
    return result


def constant_grid(value: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """(int8 codes, step) of a constant operand on one symmetric grid, as LiteRT stores it."""
    step = np.float32(max(float(np.max(np.abs(value))), 1e-12) / 127)
    return np.rint(value / step).astype(np.int8), step


def _constants_on_grids(graph: Graph) -> None:
    """Each product's or sum's constant operand (the input's normalisation) replaced by its
    value on an 8-bit grid: a full-integer model can hold no other, so both files compute
    with the same constants."""
    for node in graph.graph.node:
        if node.op_type not in ("Mul", "Add"):
            continue
        for name in node.input:
            value = graph.constants.get(name)
            if value is not None and value.dtype == np.float32:
                codes, step = constant_grid(value)
                graph.set_constant(name, (codes.astype(np.float32) * step).astype(np.float32))


def grid_roots(nodes: Sequence[Any]) -> dict[str, str]:
    """Each tensor's source: the tensor it is a moved copy of (through PASS_THROUGH nodes
    and, in an integer graph, activation QuantizeLinear/DequantizeLinear pairs), or itself."""
    producer = {out: node for node in nodes for out in node.output}
    roots: dict[str, str] = {}
    for node in nodes:
        for name in node.output:
            source, at = name, producer.get(name)
            while at is not None and (
                at.op_type in PASS_THROUGH
                or (
                    at.op_type in ("QuantizeLinear", "DequantizeLinear") and at.input[0] in producer
                )
            ):
                source = at.input[0]
                at = producer.get(source)
            roots[name] = source
    return roots


def _match_layers(graph: Graph, params: dict) -> dict[int, str]:
    """Each Conv / Gemm node's parameter path, found by its weight: the same float32 values
    as the kernel in the parameter tree (transposed from HWIO to OIHW for a Conv)."""
    by_bytes = {}
    for key, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = path_name(key)
        if path.endswith("/kernel"):
            kernel = np.asarray(leaf, np.float32)
            layout = kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel
            by_bytes[np.ascontiguousarray(layout).tobytes()] = path.removesuffix("/kernel")
    layers = {}
    for node in graph.graph.node:
        if node.op_type in LAYERS:
            weight = graph.constants.get(node.input[1])
            path = None if weight is None else by_bytes.get(np.ascontiguousarray(weight).tobytes())
            if path is None:
                raise ValueError(f"the {node.op_type} writing {node.output[0]} matches no kernel")
            layers[id(node)] = path + "/kernel"
    return layers


def calibrated_grids(model: Any, names: list[str], calibration: Sequence[np.ndarray]) -> dict:
    """An 8-bit affine grid for each tensor in `names`: its range over the calibration
    batches (holding 0), clipped where the grid's expected squared error is least."""
    from micronet_jax.deploy import onnx_sim
    from micronet_jax.quant.fake import activation_grid, mse_range

    run = onnx_sim.load(model, capture=names)
    outputs = len(model.graph.output)
    lows = {n: 0.0 for n in names}
    highs = {n: 0.0 for n in names}
    for batch in calibration:
        for name, value in zip(names, run(batch)[outputs:], strict=True):
            lows[name] = min(lows[name], float(value.min()))
            highs[name] = max(highs[name], float(value.max()))
    histograms = {n: np.zeros(HISTOGRAM_BINS) for n in names}
    for batch in calibration:
        for name, value in zip(names, run(batch)[outputs:], strict=True):
            if highs[name] > lows[name]:
                histograms[name] += np.histogram(
                    np.asarray(value), HISTOGRAM_BINS, (lows[name], highs[name])
                )[0]
    grids = {}
    for name in names:
        low, high = lows[name], highs[name]
        if high > low:
            low, high = mse_range(histograms[name], low, high, 8)
        step, zero = activation_grid(np.asarray([low, high], np.float32), 8)
        grids[name] = (np.float32(step), np.uint8(zero))
    return grids


def _quantise_weights(graph: Graph, layers: dict, params: dict, weight_scales: dict, grids):
    """Each layer's kernel as int8 codes (DequantizeLinear per output channel) and its bias
    as int32 on scale = input step × channel scale (DequantizeLinear)."""
    from onnx import helper

    from micronet_jax.quant.fake import scale_key

    for node in list(graph.graph.node):
        path = layers.get(id(node))
        if path is None:
            continue
        scales = np.asarray(weight_scales[scale_key(path)], np.float32).reshape(-1)
        weight = graph.constants[node.input[1]]
        axis = 0 if node.op_type == "Conv" else 1
        shape = [1] * weight.ndim
        shape[axis] = -1
        codes = np.rint(weight / scales.reshape(shape)).astype(np.int8)
        new = []
        codes_name = graph.new_constant(node.input[1] + "_int8", codes)
        scale_name = graph.new_constant(node.input[1] + "_scale", scales)
        zero_name = graph.new_constant(
            node.input[1] + "_zero", np.zeros_like(codes, shape=scales.shape)
        )
        new.append(
            helper.make_node(
                "DequantizeLinear",
                [codes_name, scale_name, zero_name],
                [node.input[1] + "_dq"],
                axis=axis,
            )
        )
        node.input[1] = node.input[1] + "_dq"
        if len(node.input) > 2 and node.input[2] in graph.constants:
            step = grids[node.input[0]][0]
            bias = graph.constants[node.input[2]].reshape(-1)
            bias_scale = (step * scales).astype(np.float32)
            if bias_scale.size == 1:
                bias_scale = np.full(bias.shape, bias_scale[0], np.float32)
            bias_codes = np.rint(bias / bias_scale).astype(np.int32)
            names = (
                graph.new_constant(node.input[2] + "_int32", bias_codes),
                graph.new_constant(node.input[2] + "_scale", bias_scale),
                graph.new_constant(node.input[2] + "_zero", np.zeros_like(bias_codes)),
            )
            new.append(
                helper.make_node("DequantizeLinear", list(names), [node.input[2] + "_dq"], axis=0)
            )
            node.input[2] = node.input[2] + "_dq"
        graph.replace([node], [*new, node])


def _insert_qdq(graph: Graph, grids: dict) -> None:
    """QuantizeLinear → DequantizeLinear after each gridded tensor; its readers (and, for a
    graph output, the output's name) take the dequantised value."""
    from onnx import helper

    producers = {out: node for node in graph.graph.node for out in node.output}
    first = graph.graph.node[0]
    for name, (step, zero) in grids.items():
        scale = graph.new_constant(name + "_step", np.asarray(step, np.float32))
        zero_point = graph.new_constant(name + "_zero_point", np.asarray(zero, np.uint8))
        output = name in graph.outputs
        source = name + "_float" if output else name  # an output keeps its own name
        if output:
            producers[name].output[0] = source
        readers = list(graph.consumers.get(name, []))
        dequantised = name if output else name + "_dq"
        quantise = helper.make_node("QuantizeLinear", [source, scale, zero_point], [name + "_q"])
        dequantise = helper.make_node(
            "DequantizeLinear", [name + "_q", scale, zero_point], [dequantised]
        )
        for reader in readers:
            graph.rename_input(reader, name, dequantised)
        if name in producers:
            graph.insert_after(producers[name], [quantise, dequantise])
        else:  # a graph input (the tail's features): quantised before anything else
            graph.insert_before(first, [quantise, dequantise])
