"""MicroNet as LiteRT (`.tflite`) models, float32 and full-integer int8, for XNNPACK.

The model is the network's own JAX function (`onnx_graph.forward_fn`, BN folded, XLA's
convolutions) converted by `jax2tf` and TensorFlow's `TFLiteConverter`: float32 as it is;
int8 with every tensor on an 8-bit grid (`TFLITE_BUILTINS_INT8`), kernels per output
channel, activations per tensor, calibrated by the converter on the calibration images
(the minimum and maximum it sees), the input taken as raw uint8 pixels. The converter does
not take the project's grids (it quantises every tensor, and only from the ranges it
measured), so the int8 model is its own quantisation of the same network: its fidelity is
measured against the float32 network and against its own float simulation, not against
`QuantizedApply`.

LiteRT runs a model at the batch size it was converted for (its reshapes carry it); each
file holds one batch size (1 unless asked otherwise). TensorFlow is only needed to convert:
`pip install -e ".[tflite]"`; running needs `ai-edge-litert` (the `export` extra).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from micronet_jax.errors import ConfigError

INSTALL_HINT = 'pip install -e ".[tflite]"'


def require_tensorflow() -> Any:
    """TensorFlow (quiet), or a ConfigError naming the extra that installs it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import tensorflow as tf
    except ImportError:
        raise ConfigError(f"writing .tflite files needs TensorFlow: {INSTALL_HINT}") from None
    return tf


def to_tflite(
    forward: Callable,
    input_shape: Sequence[int],
    input_dtype: Any,
    calibration: np.ndarray | None = None,
) -> bytes:
    """The `.tflite` flatbuffer of `forward` at a fixed input shape: float32, or with
    `calibration` (inputs of that shape's trailing dims) full-integer int8."""
    from jax.experimental import jax2tf

    tf = require_tensorflow()
    spec = tf.TensorSpec(tuple(input_shape), tf.as_dtype(np.dtype(input_dtype)))
    function = tf.function(
        jax2tf.convert(forward, with_gradient=False), autograph=False, input_signature=[spec]
    )
    concrete = function.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], function)
    if calibration is not None:
        batch = int(input_shape[0])
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: _batches(calibration, batch)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if np.dtype(input_dtype) == np.uint8:
            converter.inference_input_type = tf.uint8  # raw pixels in, no QUANTIZE op
    with _quiet():
        return converter.convert()


def _batches(images: np.ndarray, batch: int) -> Iterator[list[np.ndarray]]:
    for start in range(0, len(images) - batch + 1, batch):
        yield [images[start : start + batch]]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The converter prints its MLIR passes' notices on stdout and stderr."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


class Runner:
    """A `.tflite` model in LiteRT's interpreter (XNNPACK, `threads` threads): inputs of any
    count, run in the model's own batch size (the last batch padded)."""

    def __init__(self, path: str, threads: int = 2) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.outputs = sorted(self.interpreter.get_output_details(), key=_output_order)
        self.batch = int(self.input["shape"][0])

    def invoke(self, batch: np.ndarray) -> list[np.ndarray]:
        """One call on exactly one batch of the model's size."""
        self.interpreter.set_tensor(self.input["index"], batch.astype(self.input["dtype"]))
        self.interpreter.invoke()
        return [self.interpreter.get_tensor(o["index"]) for o in self.outputs]

    def __call__(self, inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        parts: list[list[np.ndarray]] = []
        for start in range(0, len(inputs), self.batch):
            chunk = inputs[start : start + self.batch]
            real = len(chunk)
            if real < self.batch:
                pad = np.repeat(chunk[-1:], self.batch - real, axis=0)
                chunk = np.concatenate([chunk, pad])
            parts.append([out[:real] for out in self.invoke(chunk)])
        return tuple(np.concatenate(outs) for outs in zip(*parts, strict=True))


def _output_order(detail: dict) -> int:
    """jax2tf names a function's outputs Identity, Identity_1, …, in the function's order."""
    name = detail["name"].split(":")[0]
    suffix = name.rsplit("_", 1)[-1]
    return int(suffix) if name != "Identity" and suffix.isdigit() else 0
