"""Post-training quantisation of both released checkpoints: every method, every width.

    python -m experiments.ptq --out=runs/ptq [--data=…/cifar-10-python.tar.gz]
        [--bits 8x8 6x6 4x8 4x4] [--methods nearest mse bias adaround mse+adaround+bias]

BN folded into the convs, weights per output channel (symmetric), the input of every conv and
dense layer on an affine grid (a depthwise conv's input per channel, or per tensor with
`WxA/tensor`), calibrated on `--num_calibration` CIFAR-10 training images; the methods
(`micronet_jax.quant.ptq`): rounding to nearest on max scales, MSE-chosen weight clipping, bias
correction, AdaRound's learned rounding, and all three. Agreement is measured on the test
images, which calibration never sees. Pruning masks are kept exactly (a pruned weight is 0
on every grid). Each row gives top-1 agreement with the float32 network on real CIFAR-10 test
images (outside its classes, so agreement, not accuracy; `confident_agreement` counts only the
images the float32 network is sure of), and the honest MicroNet score: each tensor's real
mask, BN counted as a bias, the exit ratio measured at the recipe's threshold on these images,
and at the ratio the checkpoint was published with (CIFAR-100's). `--scale_bits 16` adds the
last method's rows with float16 scales; `--peers` adds onnxruntime's own static int8
quantisation of the float32 export (MinMax, Entropy, Percentile) at 8x8.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from experiments import agreement
from micronet_jax.data.augment import eval_transform
from micronet_jax.models.fold import fold_batch_norm
from micronet_jax.quant.fake import QuantizedApply, calibrate
from micronet_jax.quant.ptq import parse_method, post_training_quantize
from micronet_jax.quant.widths import BitWidths, parse_override
from micronet_jax.scoring.counter import count_micronet

DEFAULT_BITS = ("8x8", "6x6", "4x8", "4x4")
DEFAULT_METHODS = ("nearest", "mse", "bias", "adaround", "mse+adaround+bias")
PEERS = ("MinMax", "Entropy", "Percentile")
# onnxruntime's histogram calibrators hold every intermediate output of every calibration
# image in memory (~24 MB an image for this network): 1,024 images do not fit in 24 GB
PEER_CALIBRATION = 256
COLUMNS = (
    "checkpoint",
    "bits",
    "method",
    "main_agreement",
    "exit_agreement",
    "combined_agreement",
    "confident_agreement",
    "exit_ratio",
    "score_measured_ratio",
    "score_published_ratio",
    "param_score",
    "math_score_published_ratio",
    "seconds",
)


def parse_bits(text: str, keep: Sequence[str], scale_bits: int = 32) -> BitWidths:
    """'8x8' (weights x activations; depthwise inputs per channel) or '8x8/tensor' (one grid
    per depthwise input), plus overrides such as 'stem_conv=8,32'."""
    widths, _, grids = text.partition("/")
    if grids not in ("", "channel", "tensor"):
        raise SystemExit(f"error: --bits {text!r}: after '/' comes channel or tensor")
    weights, _, activations = widths.partition("x")
    overrides = tuple(parse_override(k) for k in keep)
    return BitWidths(int(weights), int(activations), overrides, grids != "tensor", scale_bits)


def honest_score(arch, params, bits: BitWidths, ratio: float):
    return count_micronet(arch, params=params, exit_ratio=ratio, bn_as_bias=True, bits=bits)


def measure(args: argparse.Namespace) -> list[dict]:
    from micronet_jax.models.torch_import import load_original

    images, calibration_images = agreement.measured_images(
        args.data, args.num_test, args.num_calibration
    )
    batches = [calibration_images[i : i + 64] for i in range(0, len(calibration_images), 64)]
    rows = []
    for name in args.only or agreement.CHECKPOINTS:
        loaded = load_original(agreement.checkpoint_path(args.checkpoints, name))
        model, variables = loaded.model, loaded.variables
        reference = agreement.run(model.apply, variables, images, args.batch_size)
        calibration = calibrate(model, fold_batch_norm(variables), batches, eval_transform)
        published = agreement.PUBLISHED_RATIO[name]
        float_count = honest_score(loaded.arch, variables["params"], BitWidths(), published)
        rows.append(
            {"checkpoint": name, "bits": "float32 (16-bit freebie)", "method": ""}
            | _scores(float_count, None, published)
        )
        runs = [(text, method, 32) for text in args.bits for method in args.methods]
        runs += [(text, args.methods[-1], bits) for text in args.bits for bits in args.scale_bits]
        for text, method_text, scale_bits in runs:
            tic = time.perf_counter()
            bits = parse_bits(text, args.keep, scale_bits)
            quantized, _ = post_training_quantize(
                model,
                variables,
                calibration_images,
                bits,
                parse_method(method_text),
                calibration=calibration,
                iterations=args.iterations,
            )
            got = agreement.run(QuantizedApply(model, bits), quantized, images, args.batch_size)
            label = text + "".join(f" {k}" for k in args.keep)
            label += f", scales {scale_bits}-bit" if scale_bits != 32 else ""
            row = {"checkpoint": name, "bits": label, "method": method_text}
            row |= agreement.agreement(got, reference)
            params = quantized["params"]
            measured = honest_score(loaded.arch, params, bits, row["exit_ratio"])
            row |= _scores(honest_score(loaded.arch, params, bits, published), measured, published)
            row["seconds"] = time.perf_counter() - tic
            rows.append(row)
            print(agreement.proxy.markdown_table([row], COLUMNS).splitlines()[-1], flush=True)
        if args.peers:
            rows += peer_rows(name, loaded, calibration_images, images, reference, args)
    return rows


def peer_rows(name, loaded, calibration_images, images, reference, args) -> list[dict]:
    """onnxruntime's own static int8 quantisation of the float32 export, at 8x8."""
    import onnx
    import onnxruntime as ort

    from micronet_jax.deploy import onnx_graph

    rows = []
    variables = fold_batch_norm(loaded.variables)
    forward = onnx_graph.forward_fn(loaded.model, variables)
    outputs = ["logits", "exit_logits"]
    with tempfile.TemporaryDirectory() as tmp:
        float_path = str(Path(tmp) / "model.onnx")
        onnx.save(onnx_graph.to_onnx(forward, ("N", 32, 32, 3), np.uint8, outputs), float_path)
        for peer in PEERS:
            tic = time.perf_counter()
            path = str(Path(tmp) / f"{peer}.onnx")
            peer_images = calibration_images[:PEER_CALIBRATION]
            onnx_graph.static_quantize_peer(float_path, path, peer_images, peer)
            session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            parts = [
                session.run(None, {"images": images[i : i + args.batch_size]})
                for i in range(0, len(images), args.batch_size)
            ]
            got = agreement.Outputs(*(np.concatenate(p) for p in zip(*parts, strict=True)))
            row = {
                "checkpoint": name,
                "bits": "8x8 (onnxruntime quantize_static, per channel)",
                "method": f"onnxruntime {peer} ({len(peer_images)} calibration images)",
            }
            row |= agreement.agreement(got, reference)
            row["seconds"] = time.perf_counter() - tic
            rows.append(row)
            print(agreement.proxy.markdown_table([row], COLUMNS).splitlines()[-1], flush=True)
    return rows


def _scores(at_published, at_measured, ratio: float) -> dict:
    out = {
        "score_published_ratio": at_published.score,
        "param_score": at_published.param_score,
        "math_score_published_ratio": at_published.math_score,
        "published_ratio": ratio,
    }
    if at_measured is not None:
        out["score_measured_ratio"] = at_measured.score
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.ptq", description=__doc__.splitlines()[0]
    )
    agreement.add_common_args(parser)
    parser.add_argument(
        "--bits",
        nargs="+",
        default=list(DEFAULT_BITS),
        help="WxA, e.g. 8x8 (or 8x8/tensor: one grid per depthwise input)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        help="nearest, or '+'-joined mse, adaround, bias (the last one is also run with "
        "--scale_bits)",
    )
    parser.add_argument(
        "--scale_bits", nargs="*", type=int, default=[16], help="extra rows: scales at 16 bits"
    )
    parser.add_argument(
        "--keep", nargs="*", default=[], help="overrides, e.g. stem_conv=8,32 fc=8,32"
    )
    parser.add_argument("--num_calibration", type=int, default=1024)
    parser.add_argument(
        "--only", nargs="*", choices=agreement.CHECKPOINTS, help="these checkpoints (default: both)"
    )
    parser.add_argument("--iterations", type=int, default=2000, help="AdaRound's, per layer")
    parser.add_argument(
        "--peers", action="store_true", help="add onnxruntime's quantize_static rows (8x8)"
    )
    args = parser.parse_args(argv)
    rows = measure(args)
    notes = [
        f"{args.num_test:,} real CIFAR-10 test images (agreement with the float32 network); "
        f"calibration on {args.num_calibration:,} training images; "
        "scores: real masks, BN as bias, upsample not counted. Command: "
        "`python -m experiments.ptq`.",
    ]
    title = "Post-training quantisation of the released checkpoints"
    print(agreement.write(Path(args.out), "ptq", title, notes, rows, COLUMNS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
