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
    order, then the values of `capture` (tensor names) when asked."""
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
            values[outs[0]] = OPS[op]([value(i) for i in inputs], attributes)
        return tuple(values[name] for name in outputs + capture)

    return jax.jit(run)


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
