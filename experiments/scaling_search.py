"""TPE search of the compound-scaling coefficients: resolution U(1.0, 1.4), width from it.

The original's rule: width = sqrt(2 / resolution²), which keeps width²·resolution²
(roughly the FLOPs factor) at 2. Each trial is scored by proxy validation loss; its MicroNet
score is that of the base block strings scaled by (width, resolution) for CIFAR-100.
Note that `build_architecture` squares the resolution coefficient for the input size, as the
original did (1.4 -> 63 pixels).

    python -m experiments.scaling_search --out=runs/scaling              # CPU, minutes
    python -m experiments.scaling_search --out=runs/scaling --preset=full

Small scale trains the tiny network at each (width, resolution); `--preset=full` the base
block strings (CIFAR-100, 45k/5k, 1 epoch, 100 trials).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

from experiments import proxy
from micronet_jax import build_architecture
from micronet_jax.errors import CommandParser
from micronet_jax.models.architecture import BASE_BLOCK_STRINGS

RESOLUTION_RANGE = (1.0, 1.4)
COLUMNS = (
    "trial",
    "resolution",
    "width",
    "image_size",
    "val_loss",
    "val_accuracy",
    "params",
    "math_ops",
    "score",
    "seconds",
)


def width_for(resolution: float) -> float:
    """The original's coupling of width to resolution."""
    return math.sqrt(2.0 / resolution**2)


def proxy_network(kind: str, width: float, resolution: float, num_classes: int) -> Any:
    if kind == "full":
        return build_architecture(width=width, resolution=resolution, num_classes=num_classes)
    return build_architecture(
        proxy.TINY_BLOCKS,
        width=width,
        resolution=resolution,
        head_filters=64,
        num_classes=num_classes,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = CommandParser(
        prog="python -m experiments.scaling_search", description=__doc__.splitlines()[0]
    )
    proxy.add_proxy_args(parser)
    return proxy.finish_args(parser.parse_args(argv))


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = proxy.prepare(args)
    split = proxy.split_from(args)
    settings = proxy.settings_from(args, autoaugment=args.preset == "full")
    study = proxy.tpe_study(args.seed, args.startup_trials)

    def measure(trial: Any) -> tuple[dict[str, Any], str]:
        resolution = trial.suggest_float("resolution", *RESOLUTION_RANGE)
        width = width_for(resolution)
        scored = build_architecture(BASE_BLOCK_STRINGS, width=width, resolution=resolution)
        arch = proxy_network(args.proxy, width, resolution, split.num_classes)
        result = proxy.proxy_train(arch, split, settings)
        row = {
            "resolution": resolution,
            "width": width,
            "image_size": scored.image_size,
            **result,
            **proxy.micronet_numbers(scored),
        }
        return row, f"resolution {resolution:.3f} width {width:.3f}: "

    notes = [
        "width = sqrt(2 / resolution²); image size = ceil(32 · round(resolution², 2)). Score: "
        "dense MicroNet score of the base block strings at that scaling, for CIFAR-100 "
        "(16-bit, BN not counted, upsample not counted).",
    ]
    return proxy.search(study, args, out, measure, COLUMNS, "Scaling search (TPE)", notes)


def main(argv: Sequence[str] | None = None) -> int:
    proxy.print_best(run(parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
