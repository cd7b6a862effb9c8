"""TPE search of the block arguments, each candidate scored by proxy loss and MicroNet score.

The original's space: which two stages downsample (stride 2), each stage's repeats
and kernel (3 or 5), and the squeeze-excite ratio U(0.2, 0.4); channels and expansion stay
the base network's. A candidate becomes block strings, is built by `build_architecture`
(width 0.9, resolution 1.4: what would be submitted) and counted with `count_micronet`;
its proxy training decides the search (validation loss). Trial 0 is the original's network.

    python -m experiments.architecture_search --out=runs/arch_search              # CPU
    python -m experiments.architecture_search --out=runs/arch_search --preset=full

Small scale trains each candidate at a quarter of its width on 32-pixel inputs (`--proxy
tiny`); `--preset=full` trains it as built (CIFAR-100, 45k/5k, 1 epoch, 100 trials).
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from typing import Any

from experiments import proxy
from micronet_jax import build_architecture
from micronet_jax.errors import CommandParser
from micronet_jax.models.architecture import (
    BASE_BLOCK_STRINGS,
    RESOLUTION_COEFFICIENT,
    WIDTH_COEFFICIENT,
    decode_block_string,
)

BASE = tuple(decode_block_string(s) for s in BASE_BLOCK_STRINGS)
STRIDE_CHOICES: tuple[str, ...] = tuple(
    f"{a},{b}" for a, b in itertools.combinations(range(1, len(BASE)), 2)
)
REPEATS = (1, 2, 3)
KERNELS = (3, 5)
SE_RANGE = (0.2, 0.4)
TINY_WIDTH = 0.25  # small-scale proxies train a quarter-width copy
COLUMNS = ("trial", "val_loss", "val_accuracy", "params", "math_ops", "score", "seconds", "blocks")


def block_strings(
    strides: Sequence[int], repeats: Sequence[int], kernels: Sequence[int], se_ratio: float
) -> tuple[str, ...]:
    """Base channels/expansion with the searched stride stages, repeats, kernels, SE ratio."""
    out = []
    for i, base in enumerate(BASE):
        s = 2 if i in strides else 1
        out.append(
            f"r{repeats[i]}_k{kernels[i]}_s{s}_e{base.expand_ratio}_i{base.input_filters}"
            f"_o{base.output_filters}_se{se_ratio:.2f}"
        )
    return tuple(out)


def suggest_blocks(trial: Any) -> tuple[str, ...]:
    strides = [int(x) for x in trial.suggest_categorical("strides", STRIDE_CHOICES).split(",")]
    repeats = [trial.suggest_categorical(f"r{i}", REPEATS) for i in range(len(BASE))]
    kernels = [trial.suggest_categorical(f"k{i}", KERNELS) for i in range(len(BASE))]
    se_ratio = trial.suggest_float("se", *SE_RANGE)
    return block_strings(strides, repeats, kernels, se_ratio)


def original_params() -> dict[str, Any]:
    """The original's searched block arguments as trial parameters (enqueued as trial 0)."""
    strides = ",".join(str(i) for i, b in enumerate(BASE) if b.stride == 2)
    params: dict[str, Any] = {"strides": strides, "se": BASE[0].se_ratio}
    params |= {f"r{i}": b.num_repeat for i, b in enumerate(BASE)}
    params |= {f"k{i}": b.kernel_size for i, b in enumerate(BASE)}
    return params


def proxy_network(blocks: Sequence[str], kind: str, num_classes: int) -> Any:
    if kind == "full":
        return build_architecture(blocks, num_classes=num_classes)
    return build_architecture(
        blocks, width=WIDTH_COEFFICIENT * TINY_WIDTH, resolution=1.0, num_classes=num_classes
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = CommandParser(
        prog="python -m experiments.architecture_search", description=__doc__.splitlines()[0]
    )
    proxy.add_proxy_args(parser)
    parser.add_argument(
        "--no_original",
        action="store_true",
        help="do not evaluate the original's block arguments as trial 0",
    )
    args = proxy.finish_args(parser.parse_args(argv))
    return args


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = proxy.prepare(args)
    split = proxy.split_from(args)
    settings = proxy.settings_from(args, autoaugment=args.preset == "full")
    study = proxy.tpe_study(args.seed, args.startup_trials)
    if not args.no_original:
        study.enqueue_trial(original_params())

    def measure(trial: Any) -> tuple[dict[str, Any], str]:
        blocks = suggest_blocks(trial)
        scored = build_architecture(blocks, WIDTH_COEFFICIENT, resolution=RESOLUTION_COEFFICIENT)
        result = proxy.proxy_train(
            proxy_network(blocks, args.proxy, split.num_classes), split, settings
        )
        row = {
            **result,
            **proxy.micronet_numbers(scored),
            "num_blocks": len(scored.blocks),
            "blocks": " ".join(blocks),
        }
        return row, ""

    notes = [
        "Score: dense MicroNet score of the candidate as built for CIFAR-100 (width 0.9, "
        "resolution 1.4; 16-bit params and mults, BN not counted, upsample not counted), "
        "before any pruning or early exit. Trial 0 is the original's block arguments.",
    ]
    return proxy.search(study, args, out, measure, COLUMNS, "Architecture search (TPE)", notes)


def main(argv: Sequence[str] | None = None) -> int:
    proxy.print_best(run(parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
