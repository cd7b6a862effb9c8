"""Post-training quantisation of both released checkpoints, scored by the rules.

    python -m experiments.ptq --out=runs/ptq [--data=…/cifar-10-python.tar.gz] [--bits 8x8 4x8]

Weights per output channel, symmetric; the input of every conv and dense layer on an affine
grid per tensor (a depthwise conv's input per channel, or per tensor with `WxA/tensor`),
calibrated on 1,000 CIFAR-10 training images (the measured images are the test set's).
Pruning masks are kept exactly (a pruned weight is 0 on every grid). Each row gives top-1
agreement with the float32 network on real CIFAR-10 test images (outside its classes, so
agreement, not accuracy; `confident_agreement` counts only the images the float32 network
is sure of), and the honest MicroNet score: each tensor's real mask, BN counted as a bias,
the exit ratio measured at the recipe's threshold on these images, and at the ratio the
checkpoint was published with (CIFAR-100's).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from experiments import agreement
from micronet_jax.bitwidths import BitWidths, parse_override
from micronet_jax.data.augment import eval_transform
from micronet_jax.quantization import QuantizedApply, calibrate, quantize_weights
from micronet_jax.scoring import count_micronet

DEFAULT_BITS = ("8x8/tensor", "8x8", "6x6", "4x8", "4x4")
COLUMNS = (
    "checkpoint",
    "bits",
    "main_agreement",
    "exit_agreement",
    "combined_agreement",
    "confident_agreement",
    "exit_ratio",
    "score_measured_ratio",
    "score_published_ratio",
    "param_score",
    "math_score_published_ratio",
)


def parse_bits(text: str, keep: Sequence[str]) -> BitWidths:
    """'8x8' (weights x activations; depthwise inputs per channel) or '8x8/tensor' (one grid
    per depthwise input), plus overrides such as 'stem_conv=8,32'."""
    widths, _, grids = text.partition("/")
    if grids not in ("", "channel", "tensor"):
        raise SystemExit(f"error: --bits {text!r}: after '/' comes channel or tensor")
    weights, _, activations = widths.partition("x")
    overrides = tuple(parse_override(k) for k in keep)
    return BitWidths(int(weights), int(activations), overrides, grids != "tensor")


def honest_score(arch, params, bits: BitWidths, ratio: float):
    return count_micronet(arch, params=params, exit_ratio=ratio, bn_as_bias=True, bits=bits)


def measure(args: argparse.Namespace) -> list[dict]:
    from micronet_jax.convert import load_original

    images, calibration_images = agreement.measured_images(
        args.data, args.num_test, args.num_calibration
    )
    batches = np.array_split(calibration_images, max(1, len(calibration_images) // 100))
    rows = []
    for name in agreement.CHECKPOINTS:
        loaded = load_original(agreement.checkpoint_path(args.checkpoints, name))
        model, variables = loaded.model, loaded.variables
        reference = agreement.run(model.apply, variables, images, args.batch_size)
        calibration = calibrate(model, variables, batches, eval_transform)
        published = agreement.PUBLISHED_RATIO[name]
        float_count = honest_score(loaded.arch, variables["params"], BitWidths(), published)
        rows.append(
            {"checkpoint": name, "bits": "float32 (16-bit freebie)"}
            | _scores(float_count, None, published)
        )
        for text in args.bits:
            tic = time.perf_counter()
            bits = parse_bits(text, args.keep)
            ranges = calibration.ranges(bits, args.method)
            quantized = {**variables, "quant": ranges}
            got = agreement.run(QuantizedApply(model, bits), quantized, images, args.batch_size)
            params = quantize_weights(variables["params"], bits)
            row = {"checkpoint": name, "bits": text + "".join(f" {k}" for k in args.keep)}
            row |= agreement.agreement(got, reference)
            measured = honest_score(loaded.arch, params, bits, row["exit_ratio"])
            row |= _scores(honest_score(loaded.arch, params, bits, published), measured, published)
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
        "--keep", nargs="*", default=[], help="overrides, e.g. stem_conv=8,32 fc=8,32"
    )
    parser.add_argument("--num_calibration", type=int, default=1000)
    parser.add_argument("--method", choices=("mse", "max"), default="mse")
    args = parser.parse_args(argv)
    rows = measure(args)
    notes = [
        f"{args.num_test:,} real CIFAR-10 test images (agreement with the float32 network); "
        f"activation scales from {args.num_calibration:,} training images ({args.method}); "
        "scores: real masks, BN as bias, upsample not counted. Command: "
        "`python -m experiments.ptq`.",
    ]
    title = "Post-training quantisation of the released checkpoints"
    print(agreement.write(Path(args.out), "ptq", title, notes, rows, COLUMNS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
