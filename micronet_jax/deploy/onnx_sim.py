"""An exported ONNX graph's arithmetic in JAX, node by node.

For the integer graph (`onnx_int8`) this is the JAX side of its parity: every
QuantizeLinear / DequantizeLinear is computed as the ONNX standard defines it (round half to
even, saturate), everything between them in float32, so onnxruntime's integer kernels and
this simulation differ only where a value lands within a rounding error of a grid boundary.
It also records any tensor's values (`capture`), which is how the integer graph's grids are
calibrated. The ops are the ones MicroNet's graphs use; an unknown one is refused by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

CODE_RANGES = {2: (0, 255), 3: (-128, 127)}  # ONNX's uint8, int8


def load(model: Any, capture: Iterable[str] = ()) -> Callable:
    """`model` (a ModelProto) as a jitted function of its first input: its outputs in graph
    order, then the values of `capture` (tensor names) when asked.

    A Conv between DequantizeLinear inputs (an activation's codes, int8 kernel codes, int32
    bias codes) and a single QuantizeLinear is computed as an integer kernel computes it:
    the codes multiplied and summed exactly in int32, then rescaled in float32 by
    input scale × kernel scale / output scale and rounded (half to even) onto the output's
    grid, so that a sum is not rounded differently by a float summation order."""
    from onnx import helper, numpy_helper

    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
            continue
        if node.op_type not in OPS:
            raise ValueError(f"no simulation of the ONNX op {node.op_type}")
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        nodes.append((node.op_type, list(node.input), list(node.output), attributes))
    fused = _integer_convs(nodes, constants)
    source = model.graph.input[0].name
    outputs = [o.name for o in model.graph.output]
    capture = list(capture)

    def run(x):
        values: dict[str, Any] = {source: jnp.asarray(x)}

        def value(name: str) -> Any:
            if name == "":
                return None
            return values[name] if name in values else constants[name]

        for op, inputs, outs, attributes in nodes:
            if outs[0] in fused.skipped:
                continue
            if outs[0] in fused.convs:
                conv = fused.convs[outs[0]]
                values[conv.codes_out] = conv(value(conv.codes_in))
                continue
            values[outs[0]] = OPS[op]([value(i) for i in inputs], attributes)
        return tuple(values[name] for name in outputs + capture)

    return jax.jit(run)


class _IntegerConv:
    """One DequantizeLinear → Conv → QuantizeLinear chain, computed on its codes."""

    def __init__(self, conv, x_dq, w_dq, b_dq, quantize, constants) -> None:
        _, conv_in, _, self.attributes = conv
        self.codes_in = x_dq[1][0]
        self.codes_out = quantize[2][0]
        x_scale = np.float32(constants[x_dq[1][1]])
        self.x_zero = np.int32(constants[x_dq[1][2]])
        w_scale = np.asarray(constants[w_dq[1][1]], np.float32).reshape(-1)
        self.kernel = np.asarray(constants[w_dq[1][0]], np.int32)
        self.bias = None if b_dq is None else np.asarray(constants[b_dq[1][0]], np.int32)
        y_scale = np.float32(constants[quantize[1][1]])
        self.y_zero = np.float32(constants[quantize[1][2]])
        self.low, self.high = CODE_RANGES[2 if constants[quantize[1][2]].dtype == np.uint8 else 3]
        self.multiplier = (x_scale * w_scale / y_scale).astype(np.float32)  # float32, as ORT

    def __call__(self, codes: jax.Array) -> jax.Array:
        rank = self.kernel.ndim - 2
        a = self.attributes
        pads = a.get("pads", [0] * 2 * rank)
        # integers summed in float32 are exact while every partial sum stays below 2^24:
        # the fast float convolution then gives the int32 accumulator itself
        dtype = jnp.float32 if self.exact_in_float32 else jnp.int32
        shifted = (jnp.asarray(codes) - self.x_zero.astype(np.float32)).astype(dtype)
        acc = jax.lax.conv_general_dilated(
            shifted,
            jnp.asarray(self.kernel, dtype),
            tuple(a.get("strides", [1] * rank)),
            [(pads[i], pads[i + rank]) for i in range(rank)],
            rhs_dilation=tuple(a.get("dilations", [1] * rank)),
            dimension_numbers=("NCHW", "OIHW", "NCHW"),
            feature_group_count=a.get("group", 1),
            preferred_element_type=dtype,
        )
        acc = acc.astype(jnp.int32)  # exact either way
        if self.bias is not None:  # added in int32, as the kernels do (may pass 2^24)
            acc = acc + jnp.asarray(self.bias).reshape(1, -1, 1, 1)
        scaled = acc.astype(jnp.float32) * jnp.asarray(self.multiplier).reshape(1, -1, 1, 1)
        return jnp.clip(jnp.round(scaled) + self.y_zero, self.low, self.high)

    @property
    def exact_in_float32(self) -> bool:
        terms = int(np.prod(self.kernel.shape[1:]))
        return terms * 255 * int(np.abs(self.kernel).max(initial=0)) < 2**24


class _Fused:
    def __init__(self) -> None:
        self.convs: dict[str, _IntegerConv] = {}  # keyed by the Conv's output
        self.skipped: set[str] = set()  # the QuantizeLinear nodes the convs stand in for


def _integer_convs(nodes: list, constants: dict) -> _Fused:
    producer = {outs[0]: node for node in nodes for outs in [node[2]]}
    readers: dict[str, list] = {}
    for node in nodes:
        for name in node[1]:
            readers.setdefault(name, []).append(node)
    fused = _Fused()
    for node in nodes:
        op, inputs, outs, _ = node
        if op != "Conv":
            continue
        parts = [producer.get(name) for name in inputs]
        after = readers.get(outs[0], [])
        if (
            any(part is None or part[0] != "DequantizeLinear" for part in parts)
            or len(after) != 1
            or after[0][0] != "QuantizeLinear"
            or parts[0][1][0] in constants  # the activation must be computed codes
            or any(part[1][0] not in constants for part in parts[1:])
            or len(after[0][1]) < 3
        ):
            continue
        x_dq, w_dq = parts[0], parts[1]
        b_dq = parts[2] if len(parts) > 2 else None
        fused.convs[outs[0]] = _IntegerConv(node, x_dq, w_dq, b_dq, after[0], constants)
        fused.skipped.add(after[0][2][0])
    return fused


def _quantize(args, attributes):
    """The codes, kept as float32 values (their range set by the zero point's type)."""
    x, scale, zero = (args + [None])[:3]
    zero = np.zeros((), np.uint8) if zero is None else np.asarray(zero)
    low, high = CODE_RANGES[2 if zero.dtype == np.uint8 else 3]
    scale, zero_f = _per_axis(x, scale, zero, attributes)
    return jnp.clip(jnp.round(x / scale) + zero_f, low, high)


def _dequantize(args, attributes):
    codes, scale, zero = (args + [None])[:3]
    zero = np.zeros((), np.int32) if zero is None else np.asarray(zero)
    scale, zero_f = _per_axis(codes, scale, zero, attributes)
    return (jnp.asarray(codes, jnp.float32) - zero_f) * scale


def _per_axis(x, scale, zero, attributes):
    scale = jnp.asarray(scale, jnp.float32)
    zero = jnp.asarray(np.asarray(zero, np.float32))
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * np.ndim(x)
        shape[attributes.get("axis", 1) % np.ndim(x)] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return scale, zero


def _conv(args, attributes):
    x, w, b = (args + [None])[:3]
    rank = np.ndim(w) - 2
    pads = attributes.get("pads", [0] * 2 * rank)
    y = jax.lax.conv_general_dilated(
        x,
        jnp.asarray(w, jnp.float32),
        tuple(attributes.get("strides", [1] * rank)),
        [(pads[i], pads[i + rank]) for i in range(rank)],
        rhs_dilation=tuple(attributes.get("dilations", [1] * rank)),
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
        feature_group_count=attributes.get("group", 1),
    )
    return y if b is None else y + jnp.asarray(b, jnp.float32).reshape(1, -1, 1, 1)


def _gemm(args, attributes):
    a, b, c = (args + [None])[:3]
    a = a.T if attributes.get("transA", 0) else a
    b = jnp.asarray(b, jnp.float32)
    b = b.T if attributes.get("transB", 0) else b
    y = attributes.get("alpha", 1.0) * (a @ b)
    return y if c is None else y + attributes.get("beta", 1.0) * jnp.asarray(c, jnp.float32)


def _cast(args, attributes):
    return jnp.asarray(args[0]).astype(jnp.float32)


def _flatten(args, attributes):
    x = args[0]
    axis = attributes.get("axis", 1)
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


OPS: dict[str, Callable] = {
    "QuantizeLinear": _quantize,
    "DequantizeLinear": _dequantize,
    "Conv": _conv,
    "Gemm": _gemm,
    "Cast": _cast,
    "Flatten": _flatten,
    "Mul": lambda args, a: args[0] * args[1],
    "Add": lambda args, a: args[0] + args[1],
    "Sub": lambda args, a: args[0] - args[1],
    "Div": lambda args, a: args[0] / args[1],
    "Sigmoid": lambda args, a: jax.nn.sigmoid(args[0]),
    "GlobalAveragePool": lambda args, a: jnp.mean(args[0], axis=(2, 3), keepdims=True),
    "Transpose": lambda args, a: jnp.transpose(args[0], a.get("perm")),
    "Gather": lambda args, a: jnp.take(args[0], jnp.asarray(args[1]), axis=a.get("axis", 0)),
}
