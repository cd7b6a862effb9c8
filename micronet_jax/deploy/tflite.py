"""MicroNet as LiteRT (`.tflite`) models, float32 and full-integer int8, for XNNPACK.

The model is the network's own JAX function (`onnx_graph.forward_fn`, BN folded, XLA's
convolutions) converted by `jax2tf` and TensorFlow's `TFLiteConverter`: float32 as it is;
int8 with every tensor on an 8-bit grid (`TFLITE_BUILTINS_INT8`), kernels per output
channel, activations per tensor, the input taken as raw uint8 pixels. The ranges are the
converter's measurement on the calibration images, each then clipped where its grid's
expected squared error is least (`least_error_ranges`, the project's own rule for layer
inputs; `ranges='minmax'` keeps the converter's). The converter quantises every tensor and
rounds the kernels itself, so the int8 model is its own quantisation of the network, not
`QuantizedApply`'s: its fidelity is measured against the float32 network.

The converter fixes the batch size in every reshape; `free_batch` marks it free afterwards
(the network keeps the batch first in every reshape: `MicroNet(upsample="repeat")`), so one
file runs at any batch size (`Runner` resizes its interpreter to the batch it is given).
TensorFlow is only needed to convert: `pip install -e ".[tflite]"`; running needs
`ai-edge-litert` (the `export` extra).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from micronet_jax.errors import ConfigError

INSTALL_HINT = 'pip install -e ".[tflite]"'


def require_tensorflow() -> Any:
    """TensorFlow (quiet), or a ConfigError naming the extra that installs it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # its start-up notice; converting only
    try:
        import tensorflow as tf
    except ImportError:
        raise ConfigError(f"writing .tflite files needs TensorFlow: {INSTALL_HINT}") from None
    return tf


CALIBRATIONS = ("mse", "minmax")
HISTOGRAM_BINS = 2048


def to_tflite(
    forward: Callable,
    input_shape: Sequence[int],
    input_dtype: Any,
    calibration: np.ndarray | None = None,
    ranges: str = "mse",
    sparse: bool = False,
) -> bytes:
    """The `.tflite` flatbuffer of `forward` (batch left free, see `free_batch`): float32,
    or with `calibration` (inputs of the shape's trailing dims) full-integer int8, each
    tensor's grid over the range the converter measured ('minmax') or over the clip of
    least expected squared error on the same images ('mse', `quant.fake.mse_range`).
    `sparse` (float32 only) stores pruned kernels in LiteRT's sparse encoding (its
    `EXPERIMENTAL_SPARSITY`: DENSIFY ops, or XNNPACK's sparse kernels where it takes them)."""
    tf = require_tensorflow()  # first: jax2tf imports TensorFlow, whose logging it quietens
    from jax.experimental import jax2tf

    if ranges not in CALIBRATIONS:
        raise ConfigError(f"tflite calibration must be one of {CALIBRATIONS}, got {ranges!r}")
    batch = int(input_shape[0])
    spec = tf.TensorSpec(tuple(input_shape), tf.as_dtype(np.dtype(input_dtype)))
    function = tf.function(
        jax2tf.convert(forward, with_gradient=False), autograph=False, input_signature=[spec]
    )
    concrete = function.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], function)
    with _quiet(), warnings.catch_warnings():
        # the raw uint8 input carries no calibration statistics: by design, not a fault
        warnings.filterwarnings("ignore", "Statistics for quantized inputs")
        if calibration is None:
            if sparse:
                converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
            return free_batch(converter.convert(), batch)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: _batches(calibration, batch)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.experimental_mlir_quantizer = True
        converter._experimental_calibrate_only = True  # noqa: SLF001 - ranges first, then ours
        calibrated = converter.convert()
        if ranges == "mse":
            calibrated = least_error_ranges(calibrated, calibration, batch)
        from tensorflow.lite.python import convert

        quantized = convert.mlir_quantize(calibrated, fully_quantize=False)
    return free_batch(quantized, batch)


def least_error_ranges(calibrated: bytes, calibration: np.ndarray, batch: int) -> bytes:
    """A calibrated model (every tensor's min and max as the converter measured them) with
    each range clipped to where an 8-bit affine grid's expected squared error on the same
    calibration data is least: histograms of every tensor over its measured range, then
    `mse_range` on each, as the project's own calibration does for layer inputs."""
    from ai_edge_litert.interpreter import Interpreter
    from tensorflow.lite.tools import flatbuffer_utils

    from micronet_jax.quant.fake import mse_range

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(calibrated))
    ranged = {
        index: tensor
        for index, tensor in enumerate(model.subgraphs[0].tensors)
        if tensor.quantization is not None
        and tensor.quantization.min is not None
        and len(tensor.quantization.min) == 1
    }
    bounds = {
        i: (min(float(t.quantization.min[0]), 0.0), max(float(t.quantization.max[0]), 0.0))
        for i, t in ranged.items()
    }
    with warnings.catch_warnings():  # keeping every tensor is the point here, not a mistake
        warnings.simplefilter("ignore", UserWarning)
        interpreter = Interpreter(model_content=calibrated, experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    source = interpreter.get_input_details()[0]["index"]
    histograms = {i: np.zeros(HISTOGRAM_BINS) for i in ranged}
    for (images,) in _batches(calibration, batch):
        interpreter.set_tensor(source, images)
        interpreter.invoke()
        for i in ranged:
            low, high = bounds[i]
            if high > low:
                values = interpreter.get_tensor(i)
                histograms[i] += np.histogram(values, HISTOGRAM_BINS, (low, high))[0]
    for i, tensor in ranged.items():
        low, high = bounds[i]
        if high > low:
            low, high = mse_range(histograms[i], low, high, 8)
            tensor.quantization.min = np.array([low], np.float32)
            tensor.quantization.max = np.array([high], np.float32)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def free_batch(flatbuffer: bytes, batch: int) -> bytes:
    """The model with its batch size left open: every RESHAPE's target, every SLICE's size
    and every computed tensor's shape signature get -1 where they held `batch` on their
    first axis."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    graph = model.subgraphs[0]
    # the constant operand that carries a shape: a reshape's target, a slice's size
    carriers = {schema.BuiltinOperator.RESHAPE: 1, schema.BuiltinOperator.SLICE: 2}
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        which = carriers.get(max(code.builtinCode, code.deprecatedBuiltinCode))
        if which is None:
            continue
        target = model.buffers[graph.tensors[op.inputs[which]].buffer]
        shape = np.frombuffer(bytes(target.data), np.int32).copy()
        if shape[0] not in (batch, -1):  # -1: a constant shared with an op already seen
            raise ValueError(f"a shape {shape.tolist()} in the model does not keep the batch first")
        shape[0] = -1  # a slice of size -1 runs to the end of its axis
        target.data = shape.tobytes()
        options = op.builtinOptions
        if options is not None and getattr(options, "newShape", None) is not None:
            options.newShape[0] = -1
    for tensor in graph.tensors:
        computed = model.buffers[tensor.buffer].data is None
        if computed and tensor.shape is not None and len(tensor.shape) and tensor.shape[0] == batch:
            tensor.shapeSignature = np.array([-1, *tensor.shape[1:]], np.int32)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _batches(images: np.ndarray, batch: int) -> Iterator[list[np.ndarray]]:
    for start in range(0, len(images) - batch + 1, batch):
        yield [images[start : start + batch]]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The converter prints its MLIR passes' notices on stdout and stderr."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


class Runner:
    """A `.tflite` model in LiteRT's interpreter (XNNPACK, `threads` threads), run on a whole
    batch at a time: one interpreter per batch size (its tensors planned for it), batches
    larger than `pad_to` padded up to a multiple of it (1: none) so that varying sizes
    share a few interpreters."""

    def __init__(self, path: str, threads: int = 2, pad_to: int = 1) -> None:
        self.path, self.threads, self.pad_to = str(path), threads, pad_to
        self._by_batch: dict[int, Any] = {}
        first = self._interpreter(1)
        self.input = first.get_input_details()[0]
        self.outputs = sorted(first.get_output_details(), key=_output_order)

    def _interpreter(self, batch: int) -> Any:
        interpreter = self._by_batch.get(batch)
        if interpreter is None:
            from ai_edge_litert.interpreter import Interpreter

            interpreter = Interpreter(model_path=self.path, num_threads=self.threads)
            details = interpreter.get_input_details()[0]
            interpreter.resize_tensor_input(details["index"], (batch, *details["shape"][1:]))
            interpreter.allocate_tensors()
            self._by_batch[batch] = interpreter
        return interpreter

    def __call__(self, inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        count = len(inputs)
        size = count if count <= self.pad_to else -(-count // self.pad_to) * self.pad_to
        if size > count:
            inputs = np.concatenate([inputs, np.repeat(inputs[-1:], size - count, axis=0)])
        interpreter = self._interpreter(size)
        interpreter.set_tensor(self.input["index"], inputs.astype(self.input["dtype"]))
        interpreter.invoke()
        return tuple(interpreter.get_tensor(o["index"])[:count] for o in self.outputs)


def _output_order(detail: dict) -> int:
    """jax2tf names a function's outputs Identity, Identity_1, …, in the function's order."""
    name = detail["name"].split(":")[0]
    suffix = name.rsplit("_", 1)[-1]
    return int(suffix) if name != "Identity" and suffix.isdigit() else 0
