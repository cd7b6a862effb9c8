"""Is the 16-bit freebie honest? Both released checkpoints run in 16 bits against float32.

    python -m experiments.sixteen_bit --out=runs/sixteen_bit [--data=…/cifar-10-python.tar.gz]

The original counted every parameter and multiplication at 16 bits but only ever ran in
float32. Each checkpoint runs here, on 10,000 real CIFAR-10 test images (outside its classes,
so the measure is agreement with its own float32 predictions), as:
- fp16 / bf16 compute: weights, activations and all arithmetic in 16 bits (BN's running
  statistics applied in float32, its output cast back);
- fp16 values, fp32 arithmetic: every weight and every conv/dense input rounded to float16,
  products and sums in float32 (what "16-bit parameters and multiplications" claims);
- each with BN as it is, or folded into the conv before it (the kernels then carry BN's scale
  and are rounded with it; BN becomes a float32 bias).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp

from experiments import agreement
from micronet_jax import BitWidths, MicroNet, QuantizedApply, fold_batch_norm
from micronet_jax.errors import CommandParser

COLUMNS = (
    "checkpoint",
    "variant",
    "bn",
    "main_agreement",
    "exit_agreement",
    "combined_agreement",
    "confident_agreement",
    "exit_decisions_kept",
    "max_logit_diff_main",
    "max_logit_diff_exit",
)
VARIANTS = ("fp16 compute", "bf16 compute", "fp16 values, fp32 arithmetic")


def apply_fn(arch, variant: str):
    if variant == "fp16 compute":
        return MicroNet(arch, dtype=jnp.float16).apply
    if variant == "bf16 compute":
        return MicroNet(arch, dtype=jnp.bfloat16).apply
    return QuantizedApply(MicroNet(arch), BitWidths(16, 16))


def measure(args: argparse.Namespace, notes: list[str] | None = None) -> list[dict]:
    from micronet_jax import load_original

    images, _ = agreement.measured_images(args.data, args.num_test, 0)
    rows = []
    for name in agreement.CHECKPOINTS:
        loaded = load_original(agreement.checkpoint_path(args.checkpoints, name))
        reference = agreement.run(loaded.model.apply, loaded.variables, images, args.batch_size)
        if notes is not None:
            notes.append(f"{name} in float32: {agreement.near_ties(reference)}.")
        for bn, variables in (("as is", loaded.variables), ("folded", None)):
            if variables is None:
                variables = fold_batch_norm(loaded.variables)
            for variant in args.variants:
                tic = time.perf_counter()
                got = agreement.run(
                    apply_fn(loaded.arch, variant), variables, images, args.batch_size
                )
                row = {"checkpoint": name, "variant": variant, "bn": bn}
                row |= agreement.agreement(got, reference)
                row["seconds"] = time.perf_counter() - tic
                rows.append(row)
                print(agreement.proxy.markdown_table([row], COLUMNS).splitlines()[-1], flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = CommandParser(
        prog="python -m experiments.sixteen_bit", description=__doc__.splitlines()[0]
    )
    agreement.add_common_args(parser)
    parser.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), metavar="VARIANT"
    )
    args = parser.parse_args(argv)
    ties: list[str] = []
    rows = measure(args, ties)
    notes = [
        f"{args.num_test:,} real CIFAR-10 test images (outside the networks' CIFAR-100 classes: "
        "agreement with the float32 network, not accuracy); exit threshold "
        f"{agreement.THRESHOLD}. Command: `python -m experiments.sixteen_bit`.",
        *ties,
    ]
    table = agreement.write(
        Path(args.out), "sixteen_bit", "16 bits against float32", notes, rows, COLUMNS
    )
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
