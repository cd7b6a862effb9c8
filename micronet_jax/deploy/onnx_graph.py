"""MicroNet as an ONNX graph, float32 or with the project's own integer grids.

The graph is the JAX evaluation itself, converted by jax2onnx: `model.apply` with XLA's
convolutions (which become ONNX `Conv`), BN folded into the convs, and the normalisation and
the 63-pixel upsampling inside, so the graph takes raw uint8 images (N×32×32×3, NHWC).

A quantised network is `QuantizedApply` with `OnnxGrids` in place of the fake quantisation:
two primitives whose JAX implementation *is* the fake quantisation, and which jax2onnx lowers
(through the plugins registered here) to the standard QDQ form onnxruntime runs:

- a kernel: its int8 codes stored as an int8 initializer → `DequantizeLinear` (per output
  channel: `axis` on the kernel's last axis) — the same codes and scales JAX rounds to;
- a layer's input: `QuantizeLinear` → `DequantizeLinear` with the calibrated scale and
  zero point (uint8; per channel for a depthwise conv's input), after a clip to the grid's
  range when it has fewer than 256 levels.

Everything between grids (bias, swish, SE gating, pooling, residual sums) stays float32, as
in the fake quantisation, so the runtime computes what JAX computed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import mlir

from micronet_jax.data.augment import normalize_affine
from micronet_jax.models.efficientnet import MicroNet
from micronet_jax.quant.fake import FakeQuant, QuantizedApply, fake_quant_affine, weight_codes
from micronet_jax.quant.widths import BitWidths

OPSET = 21  # QuantizeLinear / DequantizeLinear per axis, ReduceMean with axes as an input
INPUT_NAME = "images"
STORAGE_BITS = 8  # codes are stored in int8 (kernels) and uint8 (inputs)


# --- primitives: the fake quantisation, named so that the converter can see it ---------------


def _qdq_impl(x, step, zero, low, high, *, bits):
    del low, high
    return fake_quant_affine(x, step, zero.astype(jnp.float32), bits)


def _dequantize_impl(codes, scale):
    return codes.astype(jnp.float32) * scale


def _primitive(name: str, impl, shape_of: int) -> Primitive:
    primitive = Primitive(name)
    primitive.def_impl(impl)
    primitive.def_abstract_eval(
        lambda *args, **_: jax.core.ShapedArray(args[shape_of].shape, jnp.float32)
    )
    mlir.register_lowering(primitive, mlir.lower_fun(impl, multiple_results=False))
    return primitive


quantize_dequantize_p = _primitive("micronet_quantize_dequantize", _qdq_impl, 0)
dequantize_p = _primitive("micronet_dequantize", _dequantize_impl, 0)


@dataclasses.dataclass(frozen=True)
class OnnxGrids(FakeQuant):
    """The fake quantisation as the two primitives above. Kernels, scales and ranges must be
    constants (closed over, as the exporter does), so that codes are known when tracing."""

    def weight(self, kernel: jax.Array, scale: jax.Array, bits: int, ste: bool) -> jax.Array:
        if bits > STORAGE_BITS:
            raise ValueError(f"kernels above {STORAGE_BITS} bits cannot be stored in int8")
        with jax.ensure_compile_time_eval():
            codes = np.asarray(weight_codes(kernel, scale, bits)).astype(np.int8)
        return dequantize_p.bind(jnp.asarray(codes), jnp.asarray(scale, jnp.float32))

    def activation(self, x, step, zero, bits, ste):
        if bits > STORAGE_BITS:
            raise ValueError(f"inputs above {STORAGE_BITS} bits cannot be stored in uint8")
        step, zero = np.asarray(step, np.float32), np.asarray(zero, np.float32)
        low, high = -zero * step, (2**bits - 1 - zero) * step
        return quantize_dequantize_p.bind(
            x,
            jnp.asarray(step),
            jnp.asarray(zero.astype(np.uint8)),
            jnp.asarray(low),
            jnp.asarray(high),
            bits=bits,
        )


# --- their lowering to ONNX -------------------------------------------------------------------


def _register_plugins() -> None:
    """Teach jax2onnx the two primitives (imported here: jax2onnx is the `export` extra)."""
    from jax2onnx.plugins.plugin_system import PrimitiveLeafPlugin, register_primitive

    def emit(ctx, eqn, op, inputs, axis, hint):
        values = [ctx.get_value_for_var(v, name_hint=ctx.fresh_name(hint)) for v in inputs]
        out = eqn.outvars[0]
        spec = ctx.get_value_for_var(out, name_hint=ctx.fresh_name(hint + "_out"))
        result = getattr(ctx.builder, op)(*values, _outputs=[ctx.fresh_name(hint)], axis=axis)
        result.type, result.shape = spec.type, spec.shape
        return result

    @register_primitive(
        jaxpr_primitive=dequantize_p.name,
        jax_doc="micronet_jax.deploy.onnx_graph",
        onnx=[{"component": "DequantizeLinear", "doc": ""}],
        since="0",
        context="primitives.micronet",
        component="dequantize",
        testcases=[],
    )
    class DequantizePlugin(PrimitiveLeafPlugin):
        def lower(self, ctx, eqn):
            codes, scale = eqn.invars
            axis = len(codes.aval.shape) - 1
            ctx.bind_value_for_var(
                eqn.outvars[0], emit(ctx, eqn, "DequantizeLinear", (codes, scale), axis, "dq_w")
            )

    @register_primitive(
        jaxpr_primitive=quantize_dequantize_p.name,
        jax_doc="micronet_jax.deploy.onnx_graph",
        onnx=[
            {"component": "QuantizeLinear", "doc": ""},
            {"component": "DequantizeLinear", "doc": ""},
        ],
        since="0",
        context="primitives.micronet",
        component="quantize_dequantize",
        testcases=[],
    )
    class QuantizeDequantizePlugin(PrimitiveLeafPlugin):
        def lower(self, ctx, eqn):
            x, step, zero, low, high = eqn.invars
            bits = eqn.params["bits"]
            axis = len(x.aval.shape) - 1
            value = ctx.get_value_for_var(x, name_hint=ctx.fresh_name("qdq_in"))
            if bits < STORAGE_BITS:  # fewer levels than uint8 holds: clip to the grid first
                bounds = [ctx.get_value_for_var(v, name_hint="qdq_bound") for v in (low, high)]
                value = ctx.builder.Max(value, bounds[0], _outputs=[ctx.fresh_name("qdq_lo")])
                value = ctx.builder.Min(value, bounds[1], _outputs=[ctx.fresh_name("qdq_hi")])
            scale, zero_point = (
                ctx.get_value_for_var(v, name_hint=ctx.fresh_name("qdq")) for v in (step, zero)
            )
            codes = ctx.builder.QuantizeLinear(
                value, scale, zero_point, _outputs=[ctx.fresh_name("q_x")], axis=axis
            )
            spec = ctx.get_value_for_var(eqn.outvars[0], name_hint=ctx.fresh_name("dq_x"))
            result = ctx.builder.DequantizeLinear(
                codes, scale, zero_point, _outputs=[ctx.fresh_name("dq_x")], axis=axis
            )
            result.type, result.shape = spec.type, spec.shape
            ctx.bind_value_for_var(eqn.outvars[0], result)


_PLUGINS: list[bool] = []


def _ensure_plugins() -> None:
    if not _PLUGINS:
        import logging

        # jax2onnx announces, with a traceback each, the plugins of libraries it cannot load
        # (dm-pix's on this JAX); none of them is used here
        logging.getLogger("jax2onnx.plugins.plugin_system").setLevel(logging.ERROR)
        _register_plugins()
        _PLUGINS.append(True)


# --- conversion -------------------------------------------------------------------------------


TARGETS = ("onnx", "tflite")


def export_model(model: MicroNet, target: str = "onnx") -> MicroNet:
    """The same network with XLA's convolutions (ONNX `Conv`, LiteRT `CONV_2D`), whatever
    the host; for LiteRT its upsampling by repetition, which keeps the batch first in every
    reshape (see `tflite.free_batch`)."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    return model.clone(conv_impl="xla", upsample="repeat" if target == "tflite" else "gather")


PARTS = ("full", "head", "tail")


def forward_fn(
    model: MicroNet,
    variables: dict,
    bits: BitWidths | None = None,
    part: str = "full",
    target: str = "onnx",
):
    """The function exported, `variables` closed over: uint8 NHWC images -> (logits, exit
    logits when the network has an exit head), normalised as one multiply-add
    (`normalize_affine`). With `bits`, the quantised network on `OnnxGrids`.

    For early exit decided by the caller, `part` 'head' is images -> (exit logits, the exit
    block's features) and 'tail' is those features -> logits. The features cross between
    the two graphs in the layout the `target` computes in: NCHW for ONNX (so that neither
    graph needs a Transpose at the boundary), NHWC for LiteRT."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    model = export_model(model, target)
    apply = model.apply if bits is None else QuantizedApply(model, bits, ops=OnnxGrids())
    nchw = target == "onnx"

    def head(module: MicroNet, x: jax.Array, train: bool = False):
        features = module.trunk(x, train)
        exit_logits = module.exit(features, train)
        return exit_logits, jnp.transpose(features, (0, 3, 1, 2)) if nchw else features

    def tail(module: MicroNet, features: jax.Array, train: bool = False):
        return module.tail(jnp.transpose(features, (0, 2, 3, 1)) if nchw else features, train)

    method = {"head": {"method": head}, "tail": {"method": tail}}.get(part, {})

    def forward(inputs):
        x = inputs if part == "tail" else normalize_affine(inputs)
        outputs = apply(variables, x, train=False, **method)
        if isinstance(outputs, tuple):
            return tuple(o for o in outputs if o is not None)
        return outputs

    return forward


def to_onnx(
    forward,
    input_shape: Sequence[Any],
    input_dtype: Any,
    output_names: Sequence[str],
    input_name: str = INPUT_NAME,
) -> Any:
    """The ONNX ModelProto of `forward` (first axis of `input_shape` may be a name: dynamic)."""
    import jax2onnx
    import onnx

    _ensure_plugins()
    spec = jax.ShapeDtypeStruct(tuple(input_shape), input_dtype)
    model = jax2onnx.to_onnx(
        forward,
        [spec],
        model_name="micronet",
        opset=OPSET,
        input_names=[input_name],
        output_names=list(output_names),
    )
    dims = [d if isinstance(d, str) else int(d) for d in input_shape]
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(input_dtype))
    model.graph.input[0].CopyFrom(onnx.helper.make_tensor_value_info(input_name, elem, dims))
    return model


def static_quantize_peer(
    float_model: str, out: str, images: np.ndarray, calibration_method: str = "MinMax"
) -> str:
    """onnxruntime's own static int8 quantisation of a float32 export (per channel, QDQ,
    `calibration_method` MinMax, Entropy or Percentile on `images`): integer kernels end to
    end, the peer a quantised export is held against."""
    import os
    import tempfile

    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(np.array_split(images, max(1, len(images) // 64)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    with tempfile.TemporaryDirectory() as tmp:
        prepared, widened = os.path.join(tmp, "prepared.onnx"), os.path.join(tmp, "gemm.onnx")
        _prepare_for_quantizer(float_model, widened)
        quant_pre_process(widened, prepared, skip_optimization=True)
        quantize_static(
            prepared,
            out,
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, calibration_method),
            # its weight-scale adjustment for int32 biases fails on the scalar biases
            # jax2onnx writes; the scales stay as calibrated
            extra_options={"QDQDisableWeightAdjustForInt32Bias": True},
        )
    return out


def _prepare_for_quantizer(path: str, out: str) -> None:
    """The float32 export as onnxruntime's quantiser needs it: every kernel a constant in the
    layout its op reads, and every Gemm bias a vector (see the two helpers below)."""
    import onnx

    model = onnx.load(path)
    _fold_kernel_transposes(model)
    _widen_gemm_biases(model)
    onnx.save(model, out)


def _fold_kernel_transposes(model: Any) -> None:
    """jax2onnx passes each conv kernel (stored HWIO, as flax holds it) through a Transpose
    to OIHW. The quantiser takes a kernel that is not an initializer for an activation: one
    scale for the whole tensor, calibrated like an activation, which leaves the network at
    chance (2% agreement here). Store the transposed kernels instead."""
    from onnx import helper, numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    kept = []
    for node in model.graph.node:
        source = initializers.get(node.input[0]) if node.op_type == "Transpose" else None
        if source is None or readers[source.name] != 1:
            kept.append(node)
            continue
        perm = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "perm")
        value = np.transpose(numpy_helper.to_array(source), perm)
        model.graph.initializer.remove(source)
        model.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
    del model.graph.node[:]
    model.graph.node.extend(kept)


def _widen_gemm_biases(model: Any) -> None:
    """jax2onnx gives each Gemm a scalar zero bias (the real one follows in an Add), which
    onnxruntime's quantiser cannot take: write it as a vector of the output width."""
    from onnx import numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "Gemm" or len(node.input) < 3:
            continue
        bias, weight = initializers.get(node.input[2]), initializers.get(node.input[1])
        if bias is None or weight is None or len(bias.dims) != 0:
            continue
        transposed = any(a.name == "transB" and a.i for a in node.attribute)
        width = weight.dims[0] if transposed else weight.dims[1]
        value = np.full(width, numpy_helper.to_array(bias), np.float32)
        bias.CopyFrom(numpy_helper.from_array(value, bias.name))
