"""Print the MicroNet table and score of a configuration, or of one of the original's checkpoints.

    python -m micronet_jax.score                                   # dense network
    python -m micronet_jax.score --sparsity=0.64 --exit_block=4 --exit_ratio=0.3217
    python -m micronet_jax.score --checkpoint=…/trained_model.pth --exit_ratio=0.3217
    python -m micronet_jax.score --checkpoint=… --weight_bits 8 --activation_bits 8 --bits fc=8,32

With --checkpoint, the honest score (each tensor's real mask) is printed beside the one the
original published (its global sparsity applied uniformly to every tensor).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from micronet_jax.errors import (
    CheckpointError,
    CommandParser,
    ConfigError,
    MicronetError,
    print_error,
)
from micronet_jax.models.architecture import Architecture, build_architecture
from micronet_jax.quant.widths import bit_widths
from micronet_jax.scoring.counter import count_micronet, measured_sparsity
from micronet_jax.scoring.table import conventions_line, format_comparison, format_table


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = CommandParser(
        prog="python -m micronet_jax.score",
        description="MicroNet Challenge count: per-layer table and scores.",
    )
    parser.add_argument(
        "--sparsity",
        type=float,
        default=0.0,
        help="fraction of every main-network weight tensor pruned (uniform)",
    )
    parser.add_argument(
        "--exit_block", type=int, default=None, help="attach the early-exit head after this block"
    )
    parser.add_argument(
        "--exit_ratio",
        type=float,
        default=None,
        help="share of test images that exit early (default 0)",
    )
    parser.add_argument(
        "--exit_sparsity",
        type=float,
        default=0.0,
        help="fraction of the exit head's weights pruned (uniform)",
    )
    parser.add_argument(
        "--bn_as_bias",
        action="store_true",
        help="count each BN as a bias of the preceding conv (final ranking)",
    )
    parser.add_argument(
        "--include_upsample",
        action="store_true",
        help="count the nearest upsample (image_size² × 3 mults)",
    )
    parser.add_argument(
        "--checkpoint", default=None, help="one of the original's .pth files: score its real masks"
    )
    parser.add_argument(
        "--weight_bits",
        type=int,
        default=32,
        help="width of every conv and dense kernel (below 16: integer, per-channel scales)",
    )
    parser.add_argument(
        "--activation_bits",
        type=int,
        default=32,
        help="width of every conv and dense layer's input (below 16: integer, one scale each)",
    )
    parser.add_argument(
        "--bits",
        action="append",
        default=[],
        metavar="PREFIX=W[,A]",
        help="widths of the layers under a parameter-path prefix, e.g. stem_conv=8 fc=8,32 "
        "(repeatable; the longest prefix wins)",
    )
    parser.add_argument(
        "--depthwise_per_tensor",
        action="store_true",
        help="one grid for a depthwise conv's whole input (default: one per channel, "
        "a scale and a zero point each)",
    )
    parser.add_argument(
        "--scale_bits",
        type=int,
        choices=(16, 32),
        default=32,
        help="width of every quantisation scale and zero point (16: stored as float16)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser.parse_args(argv)


def architecture_for(exit_block: int | None) -> Architecture:
    """The original's architecture, with the exit head where asked."""
    arch = build_architecture()
    if exit_block is not None and not 0 <= exit_block < len(arch.blocks) - 1:
        raise ConfigError(
            f"--exit_block must be in [0, {len(arch.blocks) - 2}] (the exit head needs at "
            f"least one block after it), got {exit_block}"
        )
    return arch.with_exit_head(exit_block)


def count_options(args: argparse.Namespace) -> dict[str, Any]:
    """The counter options shared by every count of one invocation."""
    return {
        "bn_as_bias": args.bn_as_bias,
        "include_upsample": args.include_upsample,
        "exit_ratio": args.exit_ratio,
        "bits": bit_widths(
            args.weight_bits,
            args.activation_bits,
            args.bits,
            not args.depthwise_per_tensor,
            args.scale_bits,
        ),
    }


def settings(args: argparse.Namespace, arch: Architecture) -> dict[str, Any]:
    return {
        "exit_block": arch.exit_head.after_block if arch.exit_head else None,
        "exit_ratio": args.exit_ratio,
        "bn_as_bias": args.bn_as_bias,
        "include_upsample": args.include_upsample,
        "weight_bits": args.weight_bits,
        "activation_bits": args.activation_bits,
        "bits": list(args.bits),
        "depthwise_per_tensor": args.depthwise_per_tensor,
        "scale_bits": args.scale_bits,
    }


def report_config(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    arch = architecture_for(args.exit_block)
    opts = count_options(args)
    count = count_micronet(arch, sparsity=args.sparsity, exit_sparsity=args.exit_sparsity, **opts)
    sparsity = f"uniform sparsity {args.sparsity:g}" if args.sparsity else "dense"
    if arch.exit_head is not None:
        exit_head = f"uniform sparsity {args.exit_sparsity:g}" if args.exit_sparsity else "dense"
        sparsity += f" (exit head {exit_head})"
    title = "MicroNet count: " + conventions_line(opts, arch, sparsity)
    data = {
        "settings": settings(args, arch)
        | {"sparsity": args.sparsity, "exit_sparsity": args.exit_sparsity},
        **count.to_dict(),
    }
    return format_table(count, title), data


def load_checkpoint(path: str) -> Any:
    """The original's .pth through the converter, imported only when a checkpoint is asked."""
    if not Path(path).is_file():
        raise CheckpointError(f"--checkpoint: no file at {path}")
    from micronet_jax.models.torch_import import load_original

    return load_original(path)


def report_checkpoint(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Honest score (real masks) beside the published convention (global sparsity, uniform)."""
    if args.sparsity or args.exit_sparsity:
        raise ConfigError("--sparsity/--exit_sparsity are read from --checkpoint; drop them")
    loaded = load_checkpoint(args.checkpoint)
    arch = loaded.arch
    exit_after = arch.exit_head.after_block if arch.exit_head else None
    if args.exit_block is not None and args.exit_block != exit_after:
        raise ConfigError(
            f"--exit_block {args.exit_block} does not match the checkpoint's exit head "
            f"(after block {exit_after})"
        )
    params = loaded.variables["params"]
    main_sparsity, exit_sparsity = measured_sparsity(arch, params)
    opts = count_options(args)
    honest = count_micronet(arch, params=params, **opts)
    published = count_micronet(arch, sparsity=main_sparsity, exit_sparsity=exit_sparsity, **opts)
    uniform = f"uniform sparsity {main_sparsity:.4%} (exit head {exit_sparsity:.4%})"
    text = "\n\n".join(
        [
            format_table(
                honest, f"{args.checkpoint}: " + conventions_line(opts, arch, "actual masks")
            ),
            format_table(
                published, "published convention: " + conventions_line(opts, arch, uniform)
            ),
            format_comparison(honest, published),
        ]
    )
    data = {
        "checkpoint": args.checkpoint,
        "settings": settings(args, arch),
        "sparsity": main_sparsity,
        "exit_sparsity": exit_sparsity,
        "actual": honest.to_dict(),
        "published_convention": published.to_dict(),
    }
    return text, data


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        counted = report_checkpoint if args.checkpoint else report_config
        text, data = counted(args)
    except MicronetError as error:
        return print_error(error)
    print(json.dumps(data, indent=2) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
