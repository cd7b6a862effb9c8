"""The exported ONNX graph as a deployment engineer expects it: about one node per operation.

jax2onnx writes the network node for node as JAX traced it: 889 nodes for MicroNet, with a
Transpose around every convolution (flax is NHWC, ONNX `Conv` NCHW), batch norm computed in
the graph, padding as Concat with zeros, shape arithmetic, a Dropout. onnxruntime's
optimiser forgives that; OpenVINO and LiteRT-style runtimes pay for it (OpenVINO ran the raw
graph at a fifth of the speed of the clean one here). `clean` rewrites it in standard ONNX
only (no runtime-specific operators):

1. onnxruntime's *basic* level: constant folding, cancelled transposes, Mul/Add folded into
   the Conv before them (batch norm is already folded into the kernels), padding into the
   Conv's `pads`, Dropout removed — all of it standard ONNX;
2. our passes for what it leaves: the transposes before the classifiers' pooling sunk into
   the pooling (the head's batch norm then folds into its Conv too), spatial means as
   `GlobalAveragePool` (the operator quantisers and runtimes know), the input upsampling as
   one Transpose and two Gathers, and each classifier's bias inside its Gemm.

Every pass is checked by the export's parity with JAX (logits within 1e-4).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from typing import Any

import numpy as np

ELEMENTWISE = {"Mul", "Add", "Sub", "Div", "Sigmoid"}
STANDARD_DOMAINS = ("", "ai.onnx")


def clean(model: Any) -> Any:
    """The deployment graph of a jax2onnx export (a ModelProto); see the module docstring."""
    import onnx

    model = basic_optimize(model)
    sink_transposes_into_means(model)
    model = basic_optimize(model)  # the head's Mul/Add now follow their Conv: fold them
    spatial_means_as_pools(model)
    simplify_input_gathers(model)
    fold_gemm_bias(model)
    _drop_unused_initializers(model)
    _keep_standard_domains(model)
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    return model


def basic_optimize(model: Any) -> Any:
    """onnxruntime's basic graph optimisations (standard ONNX rewrites only), saved."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        source, target = os.path.join(tmp, "in.onnx"), os.path.join(tmp, "out.onnx")
        onnx.save(model, source)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.log_severity_level = 3  # not its notice of every constant it folded away
        options.optimized_model_filepath = target
        ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        return onnx.load(target)


# --- the graph as maps ------------------------------------------------------------------------


class Graph:
    """Producers, consumers and constants of a ModelProto's graph, for rewriting it."""

    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        self.model = model
        self.graph = model.graph
        self.constants = {t.name: numpy_helper.to_array(t) for t in self.graph.initializer}
        self.producer = {out: node for node in self.graph.node for out in node.output}
        self.consumers: dict[str, list[Any]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in self.graph.output}
        self._removed: set[int] = set()
        self._inserted: dict[int, list[Any]] = {}
        self._after: dict[int, list[Any]] = {}

    def only_consumer(self, name: str) -> Any | None:
        readers = self.consumers.get(name, [])
        return readers[0] if len(readers) == 1 and name not in self.outputs else None

    def set_constant(self, name: str, value: np.ndarray) -> None:
        from onnx import numpy_helper

        for tensor in self.graph.initializer:
            if tensor.name == name:
                tensor.CopyFrom(numpy_helper.from_array(np.asarray(value), name))
                break
        else:
            self.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        self.constants[name] = np.asarray(value)

    def new_constant(self, hint: str, value: np.ndarray) -> str:
        name, i = hint, 0
        while name in self.constants or name in self.producer:
            i += 1
            name = f"{hint}_{i}"
        self.set_constant(name, value)
        return name

    def remove(self, nodes: Iterable[Any]) -> None:
        """Mark `nodes` for removal at `commit` (the node list is rebuilt once, at the end: a
        protobuf list copies what it is given, so references would go stale)."""
        self._removed.update(id(n) for n in nodes)

    def replace(self, nodes: list[Any], new: list[Any]) -> None:
        """Mark `nodes` for removal and `new` to take the place of the first, at `commit`."""
        self.remove(nodes)
        self._inserted.setdefault(id(nodes[0]), []).extend(new)

    def insert_before(self, node: Any, new: list[Any]) -> None:
        """Mark `new` to come before `node` (and before what was marked to replace it)."""
        self._inserted[id(node)] = [*new, *self._inserted.get(id(node), [])]

    def insert_after(self, node: Any, new: list[Any]) -> None:
        """Mark `new` to follow `node` at `commit`."""
        self._after.setdefault(id(node), []).extend(new)

    def commit(self) -> None:
        rebuilt = []

        def emit(node: Any) -> None:
            rebuilt.append(node)
            rebuilt.extend(self._after.get(id(node), []))

        for node in self.graph.node:
            for new in self._inserted.get(id(node), []):
                emit(new)
            if id(node) not in self._removed:
                emit(node)
        rebuilt = [type(node).FromString(node.SerializeToString()) for node in rebuilt]
        del self.graph.node[:]
        self.graph.node.extend(rebuilt)
        self._removed, self._inserted, self._after = set(), {}, {}

    def rename_input(self, node: Any, old: str, new: str) -> None:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def _attribute(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _set_attribute(node: Any, name: str, value: Any) -> None:
    from onnx import helper

    for attr in list(node.attribute):
        if attr.name == name:
            node.attribute.remove(attr)
    node.attribute.append(helper.make_attribute(name, value))


# --- the passes -------------------------------------------------------------------------------


def sink_transposes_into_means(model: Any) -> int:
    """Transpose(NCHW→NHWC) → elementwise ops (with per-channel or scalar constants) →
    ReduceMean over H and W: drop the Transpose, give the constants the NCHW shape and the
    mean the NCHW axes. The result is the same (N, C) (or (N, 1, 1, C) → (N, C, 1, 1), which
    is not rewritten). Returns how many transposes went."""
    graph = Graph(model)
    removed = 0
    for node in list(graph.graph.node):
        if node.op_type != "Transpose" or list(_attribute(node, "perm", [])) != [0, 2, 3, 1]:
            continue
        region = _elementwise_region(graph, node.output[0])
        if region is None:
            continue
        ops, means = region
        for op in ops:
            for name in op.input:
                value = graph.constants.get(name)
                if value is not None and value.ndim == 4:
                    new = graph.new_constant(name + "_nchw", value.transpose(0, 3, 1, 2))
                    graph.rename_input(op, name, new)
        for mean in means:
            axes_name = mean.input[1]
            axes = [int(a) % 4 for a in graph.constants[axes_name]]
            nchw = sorted({1: 2, 2: 3}[a] for a in axes)
            graph.rename_input(
                mean, axes_name, graph.new_constant(axes_name + "_nchw", np.asarray(nchw))
            )
        for reader in graph.consumers.get(node.output[0], []):
            graph.rename_input(reader, node.output[0], node.input[0])
        graph.remove([node])
        removed += 1
    graph.commit()
    del model.graph.value_info[:]  # the shapes between the two layouts changed
    return removed


def _elementwise_region(graph: Graph, start: str) -> tuple[list[Any], list[Any]] | None:
    """The elementwise ops reached from `start` and the spatial ReduceMeans (keepdims 0)
    that end every path, if that is all there is; else None."""
    ops, means, seen, todo = [], [], set(), [start]
    values = {start}
    while todo:
        name = todo.pop()
        for reader in graph.consumers.get(name, []):
            if id(reader) in seen:
                continue
            seen.add(id(reader))
            if reader.op_type == "ReduceMean":
                axes = graph.constants.get(reader.input[1]) if len(reader.input) > 1 else None
                if axes is None or sorted(int(a) % 4 for a in axes) != [1, 2]:
                    return None
                if _attribute(reader, "keepdims", 1) != 0:
                    return None
                means.append(reader)
                continue
            if reader.op_type not in ELEMENTWISE:
                return None
            for other in reader.input:
                if other in values:
                    continue
                value = graph.constants.get(other)
                if value is None or not (value.ndim == 0 or value.shape[:3] == (1, 1, 1)):
                    return None
            if reader.output[0] in graph.outputs:
                return None
            ops.append(reader)
            values.add(reader.output[0])
            todo.append(reader.output[0])
    return (ops, means) if means else None


def spatial_means_as_pools(model: Any) -> int:
    """ReduceMean over an NCHW tensor's H and W → GlobalAveragePool (+ Flatten when the
    mean dropped the axes). Returns how many were rewritten."""
    from onnx import helper

    graph = Graph(model)
    count = 0
    for node in list(graph.graph.node):
        if node.op_type != "ReduceMean" or len(node.input) < 2:
            continue
        axes = graph.constants.get(node.input[1])
        if axes is None or sorted(int(a) for a in axes) != [2, 3]:
            continue
        out = node.output[0]
        keep = _attribute(node, "keepdims", 1)
        pooled = out if keep else out + "_pooled"
        replacement = [helper.make_node("GlobalAveragePool", [node.input[0]], [pooled])]
        if not keep:
            replacement.append(helper.make_node("Flatten", [pooled], [out], axis=1))
        graph.replace([node], replacement)
        count += 1
    graph.commit()
    return count


def simplify_input_gathers(model: Any) -> bool:
    """Transposes around axis-0 Gathers with constant indices (jax2onnx's upsampling: five
    nodes) → one Transpose to the final layout and a Gather on each axis."""
    from onnx import helper

    graph = Graph(model)
    for first in list(graph.graph.node):
        if first.op_type != "Transpose":
            continue
        chain, node, gathers = [first], first, []
        layout = list(_attribute(first, "perm"))  # tensor axis i holds logical axis layout[i]
        while True:
            node = graph.only_consumer(node.output[0])
            if node is None:
                break
            if node.op_type == "Gather" and node.input[1] in graph.constants:
                axis = _attribute(node, "axis", 0) % len(layout)
                gathers.append((layout[axis], node.input[1]))
                chain.append(node)
            elif node.op_type == "Transpose":
                layout = [layout[p] for p in _attribute(node, "perm")]
                chain.append(node)
            else:
                break
        if len(gathers) < 2 or chain[-1].op_type != "Transpose":
            continue
        source, result = first.input[0], chain[-1].output[0]
        new = [helper.make_node("Transpose", [source], [result + "_layout"], perm=layout)]
        current = result + "_layout"
        for i, (logical, indices) in enumerate(gathers):
            out = result if i == len(gathers) - 1 else f"{result}_gather{i}"
            new.append(
                helper.make_node("Gather", [current, indices], [out], axis=layout.index(logical))
            )
            current = out
        graph.replace(chain, new)
        graph.commit()
        return True
    return False


def fold_gemm_bias(model: Any) -> int:
    """Gemm with a zero (or no) bias followed by Add of a constant → the constant as the
    Gemm's bias (a vector: what quantisers and runtimes expect), for float weights."""
    graph = Graph(model)
    count = 0
    for gemm in list(graph.graph.node):
        if gemm.op_type != "Gemm":
            continue
        weight = graph.producer.get(gemm.input[1])
        if weight is not None and weight.op_type == "DequantizeLinear":
            # onnxruntime turns DequantizeLinear -> Gemm with a bias into its weight-only
            # MatMulNBits kernel, which no longer computes what the graph says (7e-4 off)
            continue
        bias = graph.constants.get(gemm.input[2]) if len(gemm.input) > 2 else np.zeros(())
        add = graph.only_consumer(gemm.output[0])
        if bias is None or np.any(bias) or add is None or add.op_type != "Add":
            continue
        other = [name for name in add.input if name != gemm.output[0]]
        value = graph.constants.get(other[0]) if len(other) == 1 else None
        if value is None or value.size != value.shape[-1]:
            continue
        name = graph.new_constant(other[0] + "_bias", value.reshape(-1).astype(np.float32))
        if len(gemm.input) > 2:
            gemm.input[2] = name
        else:
            gemm.input.append(name)
        _set_attribute(gemm, "beta", 1.0)  # jax2onnx writes beta 0 beside its zero bias
        gemm.output[0] = add.output[0]
        graph.remove([add])
        count += 1
    graph.commit()
    return count


def _drop_unused_initializers(model: Any) -> None:
    used = {name for node in model.graph.node for name in node.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def _keep_standard_domains(model: Any) -> None:
    """onnxruntime's saved model imports every domain it knows; keep the ones used."""
    used = {node.domain for node in model.graph.node}
    kept = [o for o in model.opset_import if o.domain in used or o.domain in STANDARD_DOMAINS]
    del model.opset_import[:]
    model.opset_import.extend(kept)
