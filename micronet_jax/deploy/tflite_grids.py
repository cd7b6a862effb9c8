"""The learned integer network's codes and grids in a LiteRT int8 model.

TensorFlow's converter measures its own ranges and rounds the kernels itself. This module
takes the converter's full-integer model only for its graph (ops, shapes, layouts, the
batch left free) and writes the integer network's values into it: every layer's int8
kernel codes and channel scales, int32 bias codes and scales, and every tensor's grid
(step and zero point; LiteRT's int8 code is the uint8 code − 128). Tensors are matched to
the network by what they compute (`integer_net.structural_keys`: the same vocabulary for
both formats), layers by their kernels. Two places have no ONNX twin and keep a grid
derived from the network's: the spatial sum LiteRT computes a mean as (`SUM`, then `MUL` by
1/count: its grid is the mean's, times the count) and the raw pixels' (step 1).

`read_back` reads every value from a file again, for the export's check that the file
holds what JAX computed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from micronet_jax.deploy.integer_net import structural_keys

MOVES = ("QUANTIZE", "DEQUANTIZE", "CAST", "RESHAPE", "CONCATENATION", "SLICE", "PAD")
MOVES += ("TRANSPOSE", "GATHER", "SQUEEZE", "EXPAND_DIMS")
LAYERS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
OPS = {"LOGISTIC": "Sigmoid", "MUL": "Mul", "ADD": "Add", "MEAN": "Mean", "SUM": "Mean"}
INT8, INT32 = 9, 2


def _model(flatbuffer: bytes):
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(bytearray(flatbuffer), 0))
    names = {v: k for k, v in schema.BuiltinOperator.__dict__.items() if not k.startswith("_")}
    graph = model.subgraphs[0]
    ops = []
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        ops.append((names[max(code.builtinCode, code.deprecatedBuiltinCode)], op))
    return model, graph, ops


def _constant(model, graph, index: int) -> np.ndarray | None:
    tensor = graph.tensors[index]
    data = model.buffers[tensor.buffer].data if tensor.buffer < len(model.buffers) else None
    if data is None or not len(data):
        return None
    dtype = {INT8: np.int8, INT32: np.int32, 0: np.float32, 3: np.uint8}.get(tensor.type, np.int32)
    return np.frombuffer(bytes(data), dtype).reshape(tuple(int(d) for d in tensor.shape))


def _kernel_hwio(op: str, codes: np.ndarray) -> np.ndarray:
    """A LiteRT kernel in the integer network's layout: HWIO for convs, (in, out) dense."""
    if op == "CONV_2D":
        return np.transpose(codes, (1, 2, 3, 0))  # OHWI
    if op == "DEPTHWISE_CONV_2D":
        return np.transpose(codes, (1, 2, 0, 3))  # 1HWC
    return codes.T  # (out, in)


def _kernel_litert(op: str, kernel: np.ndarray) -> np.ndarray:
    if op == "CONV_2D":
        return np.transpose(kernel, (3, 0, 1, 2))
    if op == "DEPTHWISE_CONV_2D":
        return np.transpose(kernel, (2, 0, 1, 3))
    return kernel.T


def _keys(model, graph, ops, reference: dict, input_keys: dict | None = None):
    """(structural key of every tensor index, layer name of every layer op's output, the
    count a tensor holding a spatial sum instead of its mean is that mean times)."""
    from micronet_jax.deploy.integer_net import nearest_kernel

    constants = {i for i in range(len(graph.tensors)) if _constant(model, graph, i) is not None}
    producers: dict[Any, tuple[str, list]] = {}
    layers: dict[Any, str] = {}
    summed: dict[int, int] = {}  # tensor -> count: it holds a spatial sum, not the mean
    for name, op in ops:
        inputs, out = [int(i) for i in op.inputs], int(op.outputs[0])
        if name in LAYERS:
            codes = _constant(model, graph, inputs[1]).astype(np.float32)
            scale = np.asarray(graph.tensors[inputs[1]].quantization.scale, np.float32)
            kernel = _kernel_hwio(name, codes) * scale.reshape(-1)
            # the converter folds a mean's 1/count into the dense layer that reads the sum
            layers[out] = nearest_kernel(kernel * summed.get(inputs[0], 1), reference)
            producers[out] = ("Layer", inputs)
        elif name in MOVES:
            producers[out] = ("Move", inputs[:1])
            if inputs[0] in summed:
                summed[out] = summed[inputs[0]]
        elif name == "MUL" and any(i in summed for i in inputs):
            producers[out] = ("Move", [i for i in inputs if i in summed])  # SUM × 1/count
        elif name in OPS:
            producers[out] = (OPS[name], inputs if name in ("MUL", "ADD") else inputs[:1])
            if name == "SUM":  # a mean as LiteRT computes it: its key is the mean's
                shape = graph.tensors[inputs[0]].shape
                axes = _constant(model, graph, inputs[1]).reshape(-1)
                summed[out] = int(np.prod([shape[a] for a in axes]))
        else:
            raise ValueError(f"no integer-network twin of the LiteRT op {name}")
    source = int(graph.inputs[0])
    keys = structural_keys(producers, layers, constants, source)
    for name, op in ops:  # a tail's input: the features, keyed as in the whole network
        if name in LAYERS and keys[int(op.inputs[0])] == "input" and input_keys:
            found = input_keys.get(layers[int(op.outputs[0])])
            if found is not None:
                keys = structural_keys(producers, layers, constants, source, found)
            break
    return keys, layers, summed


def write_network(flatbuffer: bytes, values: tuple, reference: dict) -> bytes:
    """The converter's int8 model with the learned network's values (grids: structural
    key -> (step, uint8 zero point), also `in:<layer>`; layers: layer name -> (codes,
    scales, (bias codes, bias scale)); constant operands by their op's key), as
    `integer_net.learned_values` gives them."""
    from tensorflow.lite.tools import flatbuffer_utils

    from micronet_jax.deploy.onnx_int8 import constant_grid

    grids, layers, constants, input_keys = values
    model, graph, ops = _model(flatbuffer)
    keys, layer_of, counts = _keys(model, graph, ops, reference, input_keys)
    readers = {}
    for name, op in ops:
        if name in LAYERS:
            readers.setdefault(int(op.inputs[0]), layer_of[int(op.outputs[0])])
    for name, op in ops:
        if name in LAYERS:
            codes, scales, bias = layers[layer_of[int(op.outputs[0])]]
            scales = (scales / np.float32(counts.get(int(op.inputs[0]), 1))).astype(np.float32)
            _set_kernel(model, graph, int(op.inputs[1]), _kernel_litert(name, codes), scales)
        elif name in ("MUL", "ADD") and keys.get(int(op.outputs[0])) in constants:
            value = constants[keys[int(op.outputs[0])]]
            for index in op.inputs:
                if _constant(model, graph, int(index)) is not None:
                    codes, step = constant_grid(value)
                    shape = tuple(int(d) for d in graph.tensors[int(index)].shape)
                    _set_kernel(model, graph, int(index), codes.reshape(shape), np.float32([step]))
        if name in LAYERS:
            if bias is not None and len(op.inputs) > 2 and op.inputs[2] >= 0:
                _set_kernel(model, graph, int(op.inputs[2]), bias[0], bias[1])
    for index, tensor in enumerate(graph.tensors):
        if tensor.type != INT8 or index not in keys or _constant(model, graph, index) is not None:
            continue
        found = grids.get(keys[index])
        if found is None:
            found = grids.get("in:" + readers.get(index, ""))
        if found is None:
            continue  # the raw pixels' grid (step 1): nothing of the network's to hold
        step, zero = found
        if index in counts:
            step = np.float32(step * counts[index])
        _set_grid(tensor, step, zero)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _set_kernel(model, graph, index: int, values: np.ndarray, scales: np.ndarray) -> None:
    tensor = graph.tensors[index]
    dtype = np.int8 if tensor.type == INT8 else np.int32
    model.buffers[tensor.buffer].data = np.ascontiguousarray(values, dtype).tobytes()
    tensor.quantization.scale = np.asarray(scales, np.float32).reshape(-1)
    tensor.quantization.zeroPoint = np.zeros(np.size(scales), np.int64)


def _set_grid(tensor, step: float, zero: float) -> None:
    tensor.quantization.scale = np.asarray([step], np.float32)
    tensor.quantization.zeroPoint = np.asarray([int(zero) - 128], np.int64)


def read_back(
    flatbuffer: bytes, reference: dict, input_keys: dict | None = None
) -> tuple[dict, dict]:
    """What a LiteRT int8 model holds, in `integer_net.learned_values`' terms: ({structural
    key: (step, uint8 zero point)}, {layer name: (codes in NHWC layout, scales, (bias codes,
    bias scale))}); `input_keys` (`learned_values`' last) keys a tail's input."""
    model, graph, ops = _model(flatbuffer)
    keys, layer_of, counts = _keys(model, graph, ops, reference, input_keys)
    grids = {}
    for index, tensor in enumerate(graph.tensors):
        q = tensor.quantization
        if tensor.type != INT8 or q is None or q.scale is None or len(q.scale) != 1:
            continue
        if _constant(model, graph, index) is None and index in keys and index not in counts:
            grids[keys[index]] = (np.float32(q.scale[0]), np.float32(q.zeroPoint[0] + 128))
    layers = {}
    for name, op in ops:
        if name not in LAYERS:
            continue
        kernel = graph.tensors[int(op.inputs[1])]
        codes = _kernel_hwio(name, _constant(model, graph, int(op.inputs[1])))
        bias = None
        if len(op.inputs) > 2 and op.inputs[2] >= 0:
            b = graph.tensors[int(op.inputs[2])]
            bias = (
                _constant(model, graph, int(op.inputs[2])).reshape(-1),
                np.asarray(b.quantization.scale, np.float32),
            )
        count = np.float32(counts.get(int(op.inputs[0]), 1))
        scales = (np.asarray(kernel.quantization.scale, np.float32) * count).astype(np.float32)
        layers[layer_of[int(op.outputs[0])]] = (codes, scales, bias)
    return grids, layers
