"""`python -m micronet_jax.export`: a MicroNet as ONNX (and LiteRT) files for CPU runtimes,
float32 and quantised, with a card of what was written (the work is in
`micronet_jax.deploy.bundle`).

    python -m micronet_jax.export --checkpoint=PATH --out=DIR [--bits=8x8]
        [--calibration=cifar-10-python.tar.gz|synthetic] [--method=mse+adaround+bias]
        [--learn_steps=N] [--format=onnx,tflite]
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from micronet_jax.deploy.bundle import CONTROL_IMAGES, ExportOptions, write_bundle
from micronet_jax.deploy.integer_learn import LearnOptions
from micronet_jax.errors import CommandParser, MicronetError, print_error
from micronet_jax.quant.widths import SCALE_WIDTHS

LEARN = LearnOptions()


def parser() -> CommandParser:
    cli = CommandParser(
        prog="python -m micronet_jax.export",
        description="Export a MicroNet for CPU runtimes: model.onnx (float32, BN folded), with "
        "--bits model_int8.onnx (post-training quantised; at 8x8 on onnxruntime's integer "
        "kernels, then learned against the float32 network), with --format=onnx,tflite the "
        "LiteRT models (int8: the same codes and grids), the early-exit pair of each, "
        "card.json.",
    )
    cli.add_argument("--checkpoint", required=True, help="a .pth of the original or a workdir")
    cli.add_argument("--out", required=True, help="folder to write (must not exist)")
    cli.add_argument(
        "--bits",
        default=None,
        help="WxA, e.g. 8x8, or a width file (JSON, per layer): also write model_int8.onnx",
    )
    cli.add_argument(
        "--calibration",
        default=None,
        help="CIFAR archive (training images calibrate, test images measure), or 'synthetic': "
        "images made from the network's BN statistics (no data set; nothing measured)",
    )
    cli.add_argument(
        "--method",
        default="mse+adaround+bias",
        help="nearest, or '+'-joined mse (weight clipping), adaround, bias (correction)",
    )
    cli.add_argument(
        "--scale_bits",
        type=int,
        choices=SCALE_WIDTHS,
        default=32,
        help="scales and zero points as float16 values (16) or float32 (counted so)",
    )
    cli.add_argument(
        "--num_calibration", type=int, default=1024, help="training images that calibrate"
    )
    cli.add_argument("--num_test", type=int, default=10_000, help="test images that measure")
    cli.add_argument(
        "--num_control",
        type=int,
        default=CONTROL_IMAGES,
        help="test images for the control (the fake quantisation under XLA's convolutions "
        "against the CPU's; what two JAX lowerings disagree on); 0 skips it",
    )
    cli.add_argument(
        "--learn_steps",
        type=int,
        default=LEARN.steps,
        help="at 8x8: steps that learn the integer network (codes and grids) against the "
        "float32 network's predictions on unlabelled training images; 0: post-training only",
    )
    cli.add_argument(
        "--num_learn",
        type=int,
        default=10_000,
        help="training images the integer network learns from (synthetic: --num_calibration)",
    )
    cli.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    cli.add_argument(
        "--format",
        dest="formats",
        default="onnx",
        type=lambda text: tuple(f.strip() for f in text.split(",") if f.strip()),
        help="what to write, comma-separated: onnx, tflite (LiteRT; needs the tflite extra)",
    )
    return cli


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        card = write_bundle(ExportOptions(**vars(args)))
    except MicronetError as error:
        return print_error(error)
    print(json.dumps(card, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
