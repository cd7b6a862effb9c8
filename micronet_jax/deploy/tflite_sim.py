"""A LiteRT model's arithmetic in JAX: the yardstick its runtime's parity is measured against.

An int8 `.tflite` model is not `QuantizedApply`: the converter puts every tensor on a grid
of its own and rounds the kernels itself. So the JAX side of its parity is the model
itself, read op by op from the flatbuffer: every op's output is quantised to its tensor's
scale and zero point (round half to even, clipped to the type's range) and used as
(code - zero point) · scale; conv and dense layers are computed as the integer kernels
compute them (codes times codes summed exactly, rescaled in float32: `_on_codes`), the
other ops in float32 on their grids. XNNPACK and the simulation then part only where one of
those other ops lands a value within a rounding error of a grid boundary. Float32 models
run the same way without the grids.

The ops are the ones MicroNet's models use (an unknown op is refused by name).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

INTEGER = {9: (np.int8, -128, 127), 3: (np.uint8, 0, 255), 2: (np.int32, None, None)}
FLOAT32 = 0


class Tensor:
    """One tensor of the model: shape, type, grid (None when float), constant value."""

    def __init__(self, tensor: Any, buffers: list) -> None:
        self.shape = tuple(int(d) for d in tensor.shape) if tensor.shape is not None else ()
        self.type = int(tensor.type)
        q = tensor.quantization
        self.scale = None
        if q is not None and q.scale is not None and len(q.scale):
            self.scale = np.asarray(q.scale, np.float32)
            self.zero = np.asarray(q.zeroPoint, np.float32)
            self.axis = int(q.quantizedDimension)
        data = buffers[tensor.buffer].data if tensor.buffer < len(buffers) else None
        self.constant = None
        if data is not None and len(data):
            dtype = INTEGER.get(self.type, (np.float32,))[0] if self.type != FLOAT32 else np.float32
            self.constant = np.frombuffer(bytes(data), dtype).reshape(self.shape)

    def real(self, codes: np.ndarray) -> np.ndarray:
        """Stored codes as the values they stand for."""
        if self.scale is None:
            return np.asarray(codes, np.float32)
        shape = [1] * len(self.shape)
        if self.scale.size > 1:
            shape[self.axis] = -1
        scale, zero = self.scale.reshape(shape), self.zero.reshape(shape)
        return (np.asarray(codes, np.float32) - zero) * scale

    def on_grid(self, x: jax.Array) -> jax.Array:
        """`x` rounded to this tensor's grid (unchanged for a float tensor)."""
        if self.scale is None or self.type not in INTEGER or self.type == 2:
            return x
        _, low, high = INTEGER[self.type]
        scale, zero = jnp.asarray(self.scale[0]), jnp.asarray(self.zero[0])
        codes = jnp.clip(jnp.round(x / scale) + zero, low, high)
        return (codes - zero) * scale


def load(path_or_bytes: str | Path | bytes) -> Callable[[np.ndarray], tuple[np.ndarray, ...]]:
    """The model as a jitted JAX function of its input batch (any batch size): its outputs,
    in the order `tflite.Runner` gives them."""
    from ai_edge_litert import schema_py_generated as schema

    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(data, 0))
    graph = model.subgraphs[0]
    tensors = [Tensor(t, model.buffers) for t in graph.tensors]
    names = {v: k for k, v in schema.BuiltinOperator.__dict__.items() if not k.startswith("_")}
    ops = []
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        name = names[max(code.builtinCode, code.deprecatedBuiltinCode)]
        if name not in OPS:
            raise ValueError(f"no simulation of the LiteRT op {name}")
        ops.append((name, list(op.inputs), list(op.outputs), op.builtinOptions))
    source = graph.inputs[0]
    order = sorted(graph.outputs, key=lambda i: _output_order(graph.tensors[i].name))

    def run(images):
        values = {source: _input_value(tensors[source], images)}
        for name, inputs, outputs, options in ops:
            args = [_value(values, tensors, i) for i in inputs]
            parts, out = [tensors[i] for i in inputs], tensors[outputs[0]]
            if name in INTEGER_LAYERS and _integer_layer(parts, out):
                values[outputs[0]] = _on_codes(name, args, options, parts, out)
                continue
            result = OPS[name](args, options, parts, out)
            values[outputs[0]] = out.on_grid(result)
        return tuple(values[i] for i in order)

    return jax.jit(run)


INTEGER_LAYERS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def _integer_layer(parts: list[Tensor], out: Tensor) -> bool:
    """Whether a layer reads and writes 8-bit codes and holds int8 kernel codes."""
    x, kernel = parts[0], parts[1]
    return (
        x.type == 9
        and out.type == 9
        and kernel.type == 9
        and kernel.constant is not None
        and x.scale is not None
        and out.scale is not None
    )


def _on_codes(name: str, args: list, options: Any, parts: list[Tensor], out: Tensor):
    """A conv or dense layer as LiteRT's integer kernels compute it: the input's codes times
    the kernel's codes summed exactly (in float32, exact while every sum stays below 2^24),
    plus the int32 bias codes in int32, rescaled in float32 by input scale × kernel scale /
    output scale and rounded half to even onto the output's codes."""
    x, kernel = parts[0], parts[1]
    bias = (
        parts[2]
        if len(parts) > 2 and parts[2] is not None and parts[2].constant is not None
        else None
    )
    x_scale, x_zero = np.float32(x.scale[0]), np.float32(x.zero[0])
    codes = jnp.round(args[0] / x_scale) + x_zero  # the codes the input stands for
    kernel_codes = np.asarray(kernel.constant, np.float32)
    kernel_scale = np.asarray(kernel.scale, np.float32).reshape(-1)
    terms = (
        int(np.prod(kernel_codes.shape[1:]))
        if name != "DEPTHWISE_CONV_2D"
        else int(np.prod(kernel_codes.shape[1:3]))
    )
    if terms * 255 * 128 >= 2**24:
        raise ValueError(f"{name}: sums of {terms} products are not exact in float32")
    no_bias = np.zeros(kernel_codes.shape[-1 if name == "DEPTHWISE_CONV_2D" else 0], np.float32)
    acc = OPS[name]([codes - x_zero, kernel_codes, no_bias], options, parts, out)
    acc = acc.astype(jnp.int32)  # exact: an integer below 2^24
    if bias is not None:  # added in int32, as the kernels do (the codes may pass 2^24)
        acc = acc + jnp.asarray(np.asarray(bias.constant, np.int32))
    multiplier = (x_scale * kernel_scale / np.float32(out.scale[0])).astype(np.float32)
    y_zero = np.float32(out.zero[0])
    _, low, high = INTEGER[out.type]
    out_codes = jnp.clip(jnp.round(acc.astype(jnp.float32) * multiplier) + y_zero, low, high)
    return (out_codes - y_zero) * np.float32(out.scale[0])


def _input_value(tensor: Tensor, images: Any) -> jax.Array:
    images = jnp.asarray(images)
    if tensor.scale is not None and tensor.type in INTEGER:
        return (images.astype(jnp.float32) - tensor.zero[0]) * tensor.scale[0]
    return images


def _value(values: dict, tensors: list[Tensor], index: int) -> Any:
    if index < 0:
        return None
    if index in values:
        return values[index]
    tensor = tensors[index]
    if tensor.scale is None and tensor.type in INTEGER:  # shapes, axes, paddings
        return np.asarray(tensor.constant)
    return tensor.real(tensor.constant)  # numpy: a constant of the program, read statically


def _output_order(name: bytes | str) -> int:
    name = name.decode() if isinstance(name, bytes) else name
    name = name.split(":")[0]
    suffix = name.rsplit("_", 1)[-1]
    return int(suffix) if name != "Identity" and suffix.isdigit() else 0


def _fused(x: jax.Array, options: Any) -> jax.Array:
    activation = getattr(options, "fusedActivationFunction", 0)
    if activation == 0:
        return x
    if activation == 1:
        return jnp.maximum(x, 0.0)
    if activation == 3:
        return jnp.clip(x, 0.0, 6.0)
    raise ValueError(f"no simulation of fused activation {activation}")


def _padding(options: Any) -> str:
    return "SAME" if options.padding == 0 else "VALID"  # TensorFlow's SAME: JAX's SAME


def _convolve(x, rhs, bias, options, layout: str, groups: int = 1):
    """A CONV_2D or DEPTHWISE_CONV_2D with its options, bias and fused activation."""
    y = jax.lax.conv_general_dilated(
        x,
        rhs,
        (options.strideH, options.strideW),
        _padding(options),
        rhs_dilation=(options.dilationHFactor, options.dilationWFactor),
        dimension_numbers=("NHWC", layout, "NHWC"),
        feature_group_count=groups,
    )
    return _fused(y + (bias if bias is not None else 0.0), options)


def _conv(args, options, inputs, out):
    x, kernel, bias = args  # kernel O, H, W, I
    return _convolve(x, kernel, bias, options, "OHWI")


def _depthwise(args, options, inputs, out):
    x, kernel, bias = args  # kernel 1, H, W, C·multiplier
    rhs = jnp.transpose(kernel, (1, 2, 0, 3))  # H, W, 1, C·m
    return _convolve(x, rhs, bias, options, "HWIO", groups=x.shape[-1])


def _fully_connected(args, options, inputs, out):
    x, weights, bias = (args + [None])[:3]
    y = x.reshape(-1, weights.shape[1]) @ weights.T
    return _fused(y + (bias if bias is not None else 0.0), options)


def _binary(fn):
    return lambda args, options, inputs, out: _fused(fn(args[0], args[1]), options)


def _sum(args, options, inputs, out):
    x, axes = args
    return jnp.sum(x, axis=tuple(int(a) for a in np.asarray(axes)), keepdims=options.keepDims)


def _mean(args, options, inputs, out):
    x, axes = args
    return jnp.mean(x, axis=tuple(int(a) for a in np.asarray(axes)), keepdims=options.keepDims)


def _reshape(args, options, inputs, out):
    target = [int(d) for d in np.asarray(args[1])]
    return args[0].reshape([-1, *target[1:]] if target[0] in (-1, out.shape[0]) else target)


def _pad(args, options, inputs, out):
    pads = np.asarray(args[1]).astype(int)
    return jnp.pad(args[0], [tuple(p) for p in pads])


def _slice(args, options, inputs, out):
    x, begin, size = args
    begin = [int(b) for b in np.asarray(begin)]
    size = [
        x.shape[i] - begin[i] if int(s) == -1 else int(s) for i, s in enumerate(np.asarray(size))
    ]
    return jax.lax.slice(x, begin, [b + s for b, s in zip(begin, size, strict=True)])


def _concatenation(args, options, inputs, out):
    return _fused(jnp.concatenate(args, axis=options.axis), options)


OPS: dict[str, Callable] = {
    "CONV_2D": _conv,
    "DEPTHWISE_CONV_2D": _depthwise,
    "FULLY_CONNECTED": _fully_connected,
    "MUL": _binary(jnp.multiply),
    "ADD": _binary(jnp.add),
    "SUB": _binary(jnp.subtract),
    "LOGISTIC": lambda args, options, inputs, out: jax.nn.sigmoid(args[0]),
    "SUM": _sum,
    "MEAN": _mean,
    "RESHAPE": _reshape,
    "PAD": _pad,
    "SLICE": _slice,
    "CONCATENATION": _concatenation,
    "CAST": lambda args, options, inputs, out: args[0].astype(jnp.float32),
    "QUANTIZE": lambda args, options, inputs, out: args[0],
    "DEQUANTIZE": lambda args, options, inputs, out: args[0],
}
