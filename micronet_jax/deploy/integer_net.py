"""The integer network as a trainable JAX function: the twin of an integer ONNX graph.

`onnx_int8.integer_graph` writes the quantised network as the runtimes run it: every tensor
an integer kernel reads or writes on one 8-bit grid, kernels as int8 codes with a scale per
output channel, biases as int32 codes on input step × kernel scale. This module reads such
a graph back as parameters (each kernel and bias as the float value its codes stand for,
each grid's step and zero point) and computes the same graph with every rounding in place,
rounding through straight-through gradients (LSQ+: the grids' steps and zero points learn
too), so that the network the runtimes run can be learned against the float32 network
(`integer_learn`). `to_onnx` writes learned parameters back into the graph: the same nodes,
new codes and grids. Tensors that share a grid in the graph (a moved copy, see
`onnx_int8.grid_roots`) share one learned grid; sigmoid outputs keep LiteRT's fixed grid.

Computed in NHWC with the project's CPU-friendly convolutions (`models.conv`): the graph's
NCHW tensors are held transposed, which no op here can tell. Sums are float32 here and exact
integers in the runtimes (and in `onnx_sim`, the file's own simulation); that difference
only shows where a value lies within a float rounding of a grid boundary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from micronet_jax.models.conv import conv2d

CODES = (0, 255)  # activations: uint8
KERNEL_CODES = 127  # int8 kernels, symmetric (LiteRT requires -127..127)
NCHW_TO_NHWC_AXIS = {0: 0, 1: 3, 2: 1, 3: 2}


def round_ste(x: jax.Array) -> jax.Array:
    """Round to nearest even (as the runtimes do), with the identity's gradient."""
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def fake_quant(x: jax.Array, step: jax.Array, zero: jax.Array) -> jax.Array:
    """`x` on the uint8 grid (step, zero point): LSQ+ gradients to the step and zero point
    (the zero point rounded, straight through)."""
    zero = jnp.clip(round_ste(zero), *CODES)
    codes = jnp.clip(round_ste(x / step) + zero, *CODES)
    return (codes - zero) * step


def quantised_kernel(kernel: jax.Array, scale: jax.Array, mask: jax.Array) -> jax.Array:
    """A kernel (output channels last) on its int8 grid, pruned weights kept at 0."""
    codes = jnp.clip(round_ste(kernel / scale), -KERNEL_CODES, KERNEL_CODES)
    return codes * scale * mask


@dataclasses.dataclass
class _Layer:
    """One Conv or Gemm node: its kernel in NHWC terms and where its codes live."""

    node: int  # index into the graph's nodes
    kind: str  # "conv" or "gemm"
    codes: str  # initializer names of the kernel's int8 codes, scales, zero points
    scales: str
    bias: str | None  # initializer of the int32 bias codes (its scale: bias_scale)
    bias_scale: str | None
    input_grid: str  # the grid (root tensor) of the layer's input
    output_quantiser: int  # the QuantizeLinear node its output goes to
    attributes: dict


class IntegerNetwork:
    """An integer ONNX graph (`onnx_int8`) as parameters and a differentiable function.

    `params` holds `kernels` and `biases` in units of the graph's own kernel and bias scales
    (NHWC layouts; their codes at the start), `scales` (kernel channel scales) and `steps`
    (activation grid steps, by root tensor) as multiples of the graph's own (1 at the start:
    learning starts exactly at the graph), and `zeros` (zero points, in codes).
    `apply(params, images)` computes the graph's outputs; `to_onnx(params)` is the graph
    with those parameters' codes and grids."""

    def __init__(self, model: Any) -> None:
        from onnx import helper, numpy_helper

        from micronet_jax.deploy.onnx_int8 import grid_roots

        self.model = model
        self.constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "Constant":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.nodes = [
            (
                n.op_type,
                list(n.input),
                list(n.output),
                {a.name: helper.get_attribute_value(a) for a in n.attribute},
            )
            for n in model.graph.node
            if n.op_type != "Constant"
        ]
        self.roots = grid_roots(model.graph.node)
        self.source = model.graph.input[0].name
        self.outputs = [o.name for o in model.graph.output]
        producer = {outs[0]: i for i, (_, _, outs, _) in enumerate(self.nodes)}
        self.grids: dict[str, list[int]] = {}  # root tensor -> its QuantizeLinear nodes
        self.fixed: set[str] = set()  # grids not learned (sigmoid outputs)
        self.layers: dict[int, _Layer] = {}
        self.skipped: set[int] = set()  # DequantizeLinear nodes folded into others
        for i, (op, inputs, _, _) in enumerate(self.nodes):
            if op == "QuantizeLinear":
                root = self.roots.get(inputs[0], inputs[0])
                self.grids.setdefault(root, []).append(i)
                made_by = producer.get(root)
                if made_by is not None and self.nodes[made_by][0] == "Sigmoid":
                    self.fixed.add(root)
            elif op == "DequantizeLinear" and inputs[0] in self.constants:
                self.skipped.add(i)
            elif op in ("Conv", "Gemm"):
                self.layers[i] = self._layer(i, producer)
        self.fused = {layer.output_quantiser: i for i, layer in self.layers.items()}
        self.masks = {
            i: jnp.asarray(self._kernel_layout(layer, self.constants[layer.codes]) != 0)
            for i, layer in self.layers.items()
        }

    def _layer(self, index: int, producer: dict) -> _Layer:
        op, inputs, _, attributes = self.nodes[index]
        x_dq = self.nodes[producer[inputs[0]]]
        quantise = self.nodes[producer[x_dq[1][0]]]
        w_dq = self.nodes[producer[inputs[1]]]
        b_dq = self.nodes[producer[inputs[2]]] if len(inputs) > 2 else None
        readers = [j for j, n in enumerate(self.nodes) if self.nodes[index][2][0] in n[1]]
        if len(readers) != 1 or self.nodes[readers[0]][0] != "QuantizeLinear":
            raise ValueError(f"{op} {self.nodes[index][2][0]}: not an integer graph's layer")
        if attributes.get("transB", 0) or attributes.get("transA", 0):
            raise ValueError("a transposed Gemm operand: not an integer graph from onnx_int8")
        return _Layer(
            node=index,
            kind="conv" if op == "Conv" else "gemm",
            codes=w_dq[1][0],
            scales=w_dq[1][1],
            bias=None if b_dq is None else b_dq[1][0],
            bias_scale=None if b_dq is None else b_dq[1][1],
            input_grid=self.roots.get(quantise[1][0], quantise[1][0]),
            output_quantiser=readers[0],
            attributes=attributes,
        )

    @staticmethod
    def _kernel_layout(layer: _Layer, codes: np.ndarray) -> np.ndarray:
        """OIHW -> HWIO for a conv; a Gemm's B is (in, out) already."""
        return np.transpose(codes, (2, 3, 1, 0)) if layer.kind == "conv" else codes

    @staticmethod
    def _onnx_layout(layer: _Layer, kernel: np.ndarray) -> np.ndarray:
        return np.transpose(kernel, (3, 2, 0, 1)) if layer.kind == "conv" else kernel

    # --- parameters ----------------------------------------------------------------------

    def init_params(self) -> dict:
        """The graph's own codes and grids as parameters (learning starts exactly there)."""
        kernels, scales, biases = {}, {}, {}
        for i, layer in self.layers.items():
            codes = self._kernel_layout(layer, self.constants[layer.codes]).astype(np.float32)
            kernels[str(i)] = jnp.asarray(codes)
            scales[str(i)] = jnp.ones_like(self.kernel_scale(layer))
            if layer.bias is not None:
                biases[str(i)] = jnp.asarray(self.constants[layer.bias].astype(np.float32))
        return {
            "kernels": kernels,
            "scales": scales,
            "biases": biases,
            "steps": {root: jnp.ones((), jnp.float32) for root in self.grids},
            "zeros": {root: jnp.asarray(self.grid(root)[1]) for root in self.grids},
        }

    def kernel_scale(self, layer: _Layer) -> np.ndarray:
        """The graph's own channel scales of a layer's kernel (float32)."""
        return np.asarray(self.constants[layer.scales], np.float32).reshape(-1)

    def bias_scale(self, layer: _Layer) -> np.ndarray:
        """The graph's own scale of a layer's int32 bias (float32, per channel)."""
        return np.asarray(self.constants[layer.bias_scale], np.float32).reshape(-1)

    def grid(self, root: str) -> tuple[np.float32, np.float32]:
        """The graph's own (step, zero point) of a grid."""
        _, inputs, _, _ = self.nodes[self.grids[root][0]]
        return np.float32(self.constants[inputs[1]]), np.float32(self.constants[inputs[2]])

    def steps(self, params: dict) -> dict:
        """Every grid's step (float32): the graph's own times its learned multiple."""
        return {r: self.grid(r)[0] * params["steps"][r] for r in self.grids}

    def trainable_mask(self, params: dict) -> dict:
        """True where a parameter learns: everything but the fixed (sigmoid) grids."""
        mask = jax.tree_util.tree_map(lambda _: True, params)
        for root in self.fixed:
            mask["steps"][root] = False
            mask["zeros"][root] = False
        return mask

    # --- the function --------------------------------------------------------------------

    def apply(
        self, params: dict, images: jax.Array, quantised: bool = True, capture: bool = False
    ) -> tuple:
        """The graph's outputs on `images` (the graph's input: uint8 NHWC images, or NCHW
        features for a tail graph); `quantised=False` skips every rounding (the float
        network the parameters stand for). With `capture`, also {grid: the tensor on it}."""
        x = jnp.asarray(images)
        if x.ndim == 4 and self.model.graph.input[0].name != "images":
            x = jnp.transpose(x, (0, 2, 3, 1))  # NCHW features, held as NHWC
        values: dict[str, Any] = {self.source: x}
        nhwc: set[str] = {self.source} if self.source != "images" else set()
        grid_of = {}
        for root, quantisers in self.grids.items():
            for i in quantisers:
                grid_of[i] = root

        def value(name: str) -> Any:
            return values[name] if name in values else self.constants[name]

        steps = self.steps(params)
        captured: dict[str, Any] = {}
        for i, (op, inputs, outs, attributes) in enumerate(self.nodes):
            if i in self.skipped:
                continue
            if op == "QuantizeLinear":
                root = grid_of[i]
                if i in self.fused:  # a layer's output: rescaled from its integer sums
                    layer = self.layers[self.fused[i]]
                    y = self._apply_layer(params, steps, layer, value, quantised, root)
                    if layer.kind == "conv":
                        nhwc.add(outs[0])
                elif quantised:
                    y = fake_quant(values[inputs[0]], steps[root], params["zeros"][root])
                else:
                    y = values[inputs[0]]
                values[outs[0]] = y
                captured.setdefault(root, y)
                if inputs[0] in nhwc:
                    nhwc.add(outs[0])
                continue
            if op == "DequantizeLinear":  # the partner of the QuantizeLinear before it
                values[outs[0]] = values[inputs[0]]
                if inputs[0] in nhwc:
                    nhwc.add(outs[0])
                continue
            if i in self.layers:
                continue  # computed with its QuantizeLinear
            args = [value(name) if name else None for name in inputs]
            layout = any(name in nhwc for name in inputs)
            result, still_nhwc = _OPS[op](args, attributes, layout)
            values[outs[0]] = result
            if still_nhwc:
                nhwc.add(outs[0])
        results = []
        for name in self.outputs:
            y = values[name]
            if name in nhwc and y.ndim == 4:
                y = jnp.transpose(y, (0, 3, 1, 2))  # the graph's NCHW
            results.append(y)
        return (tuple(results), captured) if capture else tuple(results)

    def _apply_layer(self, params, steps, layer: _Layer, value, quantised: bool, out: str):
        """A layer and the grid of its output, as the integer kernels compute them: input
        codes times kernel codes summed (exact in float32 while sums stay below 2^24), the
        int32 bias codes added, one float32 rescale (input step × kernel scale / output
        step) and rounding onto the output's codes."""
        key = str(layer.node)
        _, inputs, _, a = self.nodes[layer.node]
        x, kernel = value(inputs[0]), params["kernels"][key]
        bias = params["biases"].get(key)
        mask = self.masks[layer.node]
        if not quantised:
            y = self._linear(layer, a, x, kernel * mask * self.kernel_scale(layer))
            return y if bias is None else y + bias * self.bias_scale(layer)
        x_step = steps[layer.input_grid]
        w_scale = self.kernel_scale(layer) * params["scales"][key]
        codes = jnp.clip(round_ste(kernel / params["scales"][key]), -KERNEL_CODES, KERNEL_CODES)
        acc = self._linear(layer, a, round_ste(x / x_step), codes * mask)
        if bias is not None:
            acc = acc + round_ste(bias * self.bias_scale(layer) / (x_step * w_scale))
        multiplier = x_step * w_scale / steps[out]
        zero = jnp.clip(round_ste(params["zeros"][out]), *CODES)
        y_codes = jnp.clip(round_ste(acc * multiplier) + zero, *CODES)
        return (y_codes - zero) * steps[out]

    @staticmethod
    def _linear(layer: _Layer, a: dict, x: jax.Array, kernel: jax.Array) -> jax.Array:
        if layer.kind == "gemm":
            return x @ kernel
        pads = a.get("pads", [0, 0, 0, 0])
        if pads[0] != pads[1] or pads[2] != pads[3]:
            x = jnp.pad(x, ((0, 0), (pads[0], pads[2]), (pads[1], pads[3]), (0, 0)))
            padding = (0, 0)
        else:
            padding = (pads[0], pads[2])
        stride = a.get("strides", [1, 1])[0]
        return conv2d(x, kernel, stride, padding, a.get("group", 1))

    # --- back to the graph ---------------------------------------------------------------

    def to_onnx(self, params: dict) -> Any:
        """The graph with `params`' codes and grids (a new ModelProto; nodes unchanged)."""
        steps = {r: np.float32(v) for r, v in self.steps(params).items()}
        zeros = {r: _zero_code(params["zeros"][r]) for r in self.grids}
        layers = {i: self.layer_codes(params, layer, steps) for i, layer in self.layers.items()}
        return self.write(steps, zeros, layers)

    def write(self, steps: dict, zeros: dict, layers: dict) -> Any:
        """The graph with these values: grid steps and zero points by root tensor, (codes,
        scales, bias) by layer node as `layer_codes` gives them."""
        import copy

        from onnx import numpy_helper

        values: dict[str, np.ndarray] = {}
        for root, quantisers in self.grids.items():
            for i in quantisers:
                _, inputs, _, _ = self.nodes[i]
                values[inputs[1]] = np.float32(steps[root])
                values[inputs[2]] = np.uint8(zeros[root])
        for i, layer in self.layers.items():
            codes, scales, bias = layers[i]
            values[layer.codes] = self._onnx_layout(layer, codes)
            values[layer.scales] = scales
            if bias is not None:
                values[layer.bias], values[layer.bias_scale] = bias
        model = copy.deepcopy(self.model)
        for tensor in model.graph.initializer:
            if tensor.name in values:
                dtype = numpy_helper.to_array(tensor).dtype
                new = np.asarray(values[tensor.name]).astype(dtype).reshape(tuple(tensor.dims))
                tensor.CopyFrom(numpy_helper.from_array(new, tensor.name))
        return model

    def layer_codes(self, params: dict, layer: _Layer, steps: dict | None = None):
        """(int8 kernel codes in NHWC layout, float32 channel scales, (int32 bias codes,
        float32 bias scale) or None) as the files store them."""
        key = str(layer.node)
        multiple = np.asarray(params["scales"][key], np.float32)
        scales = (self.kernel_scale(layer) * multiple).astype(np.float32)
        kernel = np.asarray(params["kernels"][key], np.float32)
        codes = np.clip(np.rint(kernel / multiple), -KERNEL_CODES, KERNEL_CODES)
        codes = (codes * np.asarray(self.masks[layer.node])).astype(np.int8)
        if layer.bias is None:
            return codes, scales, None
        if steps is None:
            steps = {r: np.float32(v) for r, v in self.steps(params).items()}
        bias_scale = (steps[layer.input_grid] * scales).astype(np.float32)
        bias = np.asarray(params["biases"][key], np.float32) * self.bias_scale(layer)
        bias_codes = np.rint(bias / bias_scale)
        return codes, scales, (bias_codes.astype(np.int32), bias_scale)


# --- the other ops, NCHW tensors held as NHWC -------------------------------------------------


def _binary(fn):
    def op(args, attributes, nhwc):
        a, b = (jnp.asarray(_as_nhwc(v, nhwc)) for v in args)
        return fn(a, b), nhwc

    return op


def _as_nhwc(v: Any, nhwc: bool) -> Any:
    """A constant operand of an NCHW op, (1, C, 1, 1) or (C, 1, 1), in NHWC order."""
    if nhwc and isinstance(v, np.ndarray) and v.ndim >= 3 and v.shape[-1] == 1:
        return np.moveaxis(v, -3, -1)
    return v


def _transpose(args, attributes, nhwc):
    perm = list(attributes.get("perm", []))
    if not nhwc and perm == [0, 3, 1, 2]:
        return args[0], True  # the input's NHWC -> NCHW: held as it is
    if nhwc and perm == [0, 2, 3, 1]:
        return args[0], False  # back to real NHWC
    raise ValueError(f"no twin of Transpose{perm} on a {'NHWC-held' if nhwc else 'plain'} tensor")


def _gather(args, attributes, nhwc):
    axis = attributes.get("axis", 0)
    axis = NCHW_TO_NHWC_AXIS[axis % 4] if nhwc else axis
    return jnp.take(args[0], jnp.asarray(args[1]), axis=axis), nhwc


def _pool(args, attributes, nhwc):
    return jnp.mean(args[0], axis=(1, 2) if nhwc else (2, 3), keepdims=True), nhwc


def _flatten(args, attributes, nhwc):
    x = args[0]
    if nhwc:  # only spatial 1x1 tensors are flattened in MicroNet's graphs
        assert x.shape[1] == x.shape[2] == 1, x.shape
    axis = attributes.get("axis", 1)
    return x.reshape(int(np.prod(x.shape[:axis])), -1), False


_OPS: dict[str, Callable] = {
    "Cast": lambda args, a, nhwc: (jnp.asarray(args[0]).astype(jnp.float32), nhwc),
    "Mul": _binary(jnp.multiply),
    "Add": _binary(jnp.add),
    "Sub": _binary(jnp.subtract),
    "Div": _binary(jnp.divide),
    "Sigmoid": lambda args, a, nhwc: (jax.nn.sigmoid(args[0]), nhwc),
    "GlobalAveragePool": _pool,
    "Transpose": _transpose,
    "Gather": _gather,
    "Flatten": _flatten,
}


# --- one tensor's name in every file: its place in the network --------------------------------


def structural_keys(
    producers: dict[str, tuple[str, list[str]]],
    layers: dict[str, str],
    constants: set[str],
    source: str,
    source_key: str = "input",
) -> dict[str, str]:
    """Each tensor's key: what it computes from the input and the layers, in one vocabulary
    for ONNX and LiteRT graphs: a layer's output is `out:<layer>`, a sigmoid `Sigmoid(k)`, a
    product or sum of tensors `Mul(k1,k2)` / `Add(..)` (operands sorted; constant operands
    left out), a spatial mean `Mean(k)`; ops that only move values keep their input's key.
    `producers` maps a tensor to (normalised op, inputs), `layers` a layer's output tensor
    to its layer's name; the graph's input is `source_key` (a tail graph's features: the key
    they have in the whole network)."""
    keys: dict[str, str] = {source: source_key}

    def key(name: str) -> str:
        stack = [name]
        while stack:
            top = stack[-1]
            if top in keys:
                stack.pop()
                continue
            op, inputs = producers.get(top, ("Input", []))
            operands = [i for i in inputs if i not in ("", -1) and i not in constants]
            missing = [i for i in operands if i not in keys]
            if missing and op not in ("Layer", "Input"):
                stack.extend(missing)
                continue
            stack.pop()
            if op == "Layer":
                keys[top] = "out:" + layers[top]
            elif op == "Input":
                keys[top] = "input:" + top
            elif not operands:  # computed from constants alone
                keys[top] = f"const:{top}"
            elif op == "Move":
                keys[top] = keys[operands[0]]
            else:
                keys[top] = f"{op}({','.join(sorted(keys[o] for o in operands))})"
        return keys[name]

    for name in producers:
        key(name)
    return keys


ONNX_OPS = {
    "Sigmoid": "Sigmoid",
    "Mul": "Mul",
    "Add": "Add",
    "GlobalAveragePool": "Mean",
    **{op: "Move" for op in ("QuantizeLinear", "DequantizeLinear", "Cast", "Transpose")},
    **{op: "Move" for op in ("Gather", "Flatten", "Reshape")},
}


def onnx_keys(
    net: IntegerNetwork, names: dict[int, str], input_key: str = "input"
) -> dict[str, str]:
    """Every tensor's structural key in `net`'s graph, its layers named by `names`."""
    producers, layers = {}, {}
    for i, (op, inputs, outs, _) in enumerate(net.nodes):
        if i in net.layers:
            producers[outs[0]] = ("Layer", inputs)
            layers[outs[0]] = names[i]
        elif i not in net.skipped:
            producers[outs[0]] = (ONNX_OPS.get(op, op), inputs)
    return structural_keys(producers, layers, set(net.constants), net.source, input_key)


def reference_kernels(params: dict) -> dict[str, np.ndarray]:
    """The float32 kernels of a (BN-folded) parameter tree by layer path: what layers in
    every file are named after."""
    from micronet_jax.models.paths import path_name

    return {
        path_name(key).removesuffix("/kernel"): np.asarray(leaf, np.float32)
        for key, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        if path_name(key).endswith("/kernel")
    }


def float_params(net: IntegerNetwork, params: dict, folded: dict) -> dict:
    """`params` with the float32 network's own kernels and biases (BN-folded `folded`
    parameters) in the twin's units: with `apply(quantised=False)`, the float network
    computed along the integer graph, whose every gridded tensor is a target."""
    from micronet_jax.models.paths import path_name

    biases = {
        path_name(key).removesuffix("/bias"): np.asarray(leaf, np.float32)
        for key, leaf in jax.tree_util.tree_flatten_with_path(folded)[0]
        if path_name(key).endswith("/bias")
    }
    reference = reference_kernels(folded)
    names = layer_names(net, reference)
    new = dict(params, kernels=dict(params["kernels"]), biases=dict(params["biases"]))
    for i, layer in net.layers.items():
        new["kernels"][str(i)] = jnp.asarray(reference[names[i]] / net.kernel_scale(layer))
        if layer.bias is not None and names[i] in biases:
            new["biases"][str(i)] = jnp.asarray(biases[names[i]] / net.bias_scale(layer))
    return new


def layer_names(net: IntegerNetwork, reference: dict[str, np.ndarray]) -> dict[int, str]:
    """Each layer of `net` named after the `reference` kernel (name -> HWIO or (in, out)
    float values) its own start kernel is nearest to, among kernels of its shape."""
    names = {}
    for i, layer in net.layers.items():
        codes = net._kernel_layout(layer, net.constants[layer.codes]).astype(np.float32)
        kernel = codes * net.kernel_scale(layer)
        names[i] = nearest_kernel(kernel, reference)
    return names


def nearest_kernel(kernel: np.ndarray, reference: dict[str, np.ndarray]) -> str:
    candidates = [n for n, k in reference.items() if k.shape == kernel.shape]
    if not candidates:
        raise ValueError(f"no kernel of shape {kernel.shape} to match")
    errors = [float(np.sum((reference[n] - kernel) ** 2)) for n in candidates]
    return candidates[int(np.argmin(errors))]


def learned_values(net: IntegerNetwork, params: dict, names: dict[int, str]):
    """What a learned network stores, by structural key: {key: (step, zero point)} for
    every grid (also under `in:<layer>` for a layer's input), {layer name: (codes, scales,
    bias)} (NHWC layouts) for every layer, {key of a product or sum: its constant operand}
    (the input's normalisation), and {layer name: the key of its input} (what a tail
    graph's input is)."""
    keys = onnx_keys(net, names)
    constants = {}
    for op, inputs, outs, _ in net.nodes:
        if op in ("Mul", "Add"):
            for name in inputs:
                if name in net.constants and net.constants[name].dtype == np.float32:
                    constants[keys[outs[0]]] = net.constants[name]
    steps = {r: np.float32(v) for r, v in net.steps(params).items()}
    grids = {}
    for root in net.grids:
        grids[keys[root]] = (steps[root], _zero_code(params["zeros"][root]))
    layers, input_keys = {}, {}
    for i, layer in net.layers.items():
        layers[names[i]] = net.layer_codes(params, layer, steps)
        grids["in:" + names[i]] = (steps[layer.input_grid], grids[keys[layer.input_grid]][1])
        input_keys[names[i]] = keys[layer.input_grid]
    return grids, layers, constants, input_keys


def transfer(source: IntegerNetwork, params: dict, target: IntegerNetwork, reference: dict):
    """`target`'s graph (another graph of the same network: the early-exit pair's head or
    tail) holding `source`'s learned codes and grids, matched by structural key and kernel.
    Every grid and layer of `target` must be found."""
    grids, layers, _, input_keys = learned_values(source, params, layer_names(source, reference))
    names = layer_names(target, reference)
    readers = {t.input_grid: names[i] for i, t in target.layers.items()}
    keys = onnx_keys(target, names, input_keys.get(readers.get(target.source, ""), "input"))
    steps, zeros = {}, {}
    for root in target.grids:
        found = grids.get(keys[root]) or grids.get("in:" + readers.get(root, ""))
        if found is None:
            raise ValueError(f"the grid of {root} ({keys[root]}) is not in the learned network")
        steps[root], zeros[root] = found
    return target.write(steps, zeros, {i: layers[names[i]] for i in target.layers})


def _zero_code(zero: Any) -> np.float32:
    return np.float32(np.clip(np.rint(np.float32(zero)), *CODES))
