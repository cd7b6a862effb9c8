"""The one source of truth for the network's shape: block strings + compound scaling.

The model (`efficientnet.py`), the MicroNet counter (`scoring.py`) and the checkpoint
converter (`convert.py`) all read an `Architecture` built here, so they cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

# The original's searched base network (before width/depth/resolution scaling).
BASE_BLOCK_STRINGS: tuple[str, ...] = (
    "r1_k3_s1_e1_i24_o16_se0.20",
    "r1_k3_s1_e6_i16_o24_se0.20",
    "r2_k3_s2_e6_i24_o40_se0.20",
    "r1_k3_s1_e6_i40_o56_se0.20",
    "r2_k3_s1_e6_i56_o72_se0.20",
    "r2_k3_s2_e6_i72_o88_se0.20",
    "r1_k3_s1_e6_i88_o104_se0.20",
)
BASE_HEAD_FILTERS = 150
WIDTH_COEFFICIENT = 0.9
DEPTH_COEFFICIENT = 1.0
RESOLUTION_COEFFICIENT = 1.4
DROP_CONNECT_RATE = 0.2
DROPOUT_RATE = 0.2
CIFAR_IMAGE_SIZE = 32


@dataclasses.dataclass(frozen=True)
class BlockString:
    """One decoded base block string, e.g. ``r2_k3_s2_e6_i24_o40_se0.20``."""

    num_repeat: int
    kernel_size: int
    stride: int
    expand_ratio: int
    input_filters: int
    output_filters: int
    se_ratio: float
    id_skip: bool = True


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One concrete MBConv block of the scaled network."""

    index: int
    kernel_size: int
    stride: int
    expand_ratio: int
    input_filters: int
    output_filters: int
    se_filters: int
    has_skip: bool
    drop_connect_rate: float
    input_size: int
    output_size: int

    @property
    def mid_filters(self) -> int:
        return self.input_filters * self.expand_ratio

    @property
    def has_expand(self) -> bool:
        return self.expand_ratio != 1


@dataclasses.dataclass(frozen=True)
class ExitHeadSpec:
    """The early-exit head: depthwise conv, BN, swish, 1x1 conv, BN, swish, pool, FC."""

    after_block: int
    input_filters: int
    head_filters: int
    kernel_size: int
    size: int


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Everything needed to build, count or convert a MicroNet."""

    input_size: int  # native image size (32 for CIFAR)
    image_size: int  # after the nearest upsample
    pad_reference_size: int  # convs pad as TF "same" would for this input size
    stem_filters: int
    stem_size: int  # spatial size after the stem
    blocks: tuple[BlockSpec, ...]
    head_filters: int
    num_classes: int
    dropout_rate: float
    exit_head: ExitHeadSpec | None = None

    @property
    def final_size(self) -> int:
        return self.blocks[-1].output_size

    def with_exit_head(self, after_block: int | None) -> Architecture:
        """A copy with the early-exit head after block `after_block` (None removes it)."""
        if after_block is None:
            return dataclasses.replace(self, exit_head=None)
        if not 0 <= after_block < len(self.blocks) - 1:
            raise ValueError(
                f"exit block must be in [0, {len(self.blocks) - 2}] (the exit head needs at "
                f"least one block after it), got {after_block}"
            )
        block = self.blocks[after_block]
        spec = ExitHeadSpec(
            after_block=after_block,
            input_filters=block.output_filters,
            head_filters=self.head_filters,
            kernel_size=3,
            size=block.output_size,
        )
        return dataclasses.replace(self, exit_head=spec)


_BLOCK_RE = re.compile(r"^([a-z]+)([0-9.]+)$")
_FIELDS = ("r", "k", "s", "e", "i", "o", "se")


def decode_block_string(text: str) -> BlockString:
    """Parse ``r1_k3_s1_e6_i16_o24_se0.20`` (optionally ``_noskip``)."""
    fields: dict[str, str] = {}
    id_skip = True
    for part in text.split("_"):
        if part == "noskip":
            id_skip = False
            continue
        match = _BLOCK_RE.match(part)
        if not match:
            raise ValueError(f"malformed block string {text!r}: cannot parse {part!r}")
        name = match.group(1)
        if name not in _FIELDS:
            raise ValueError(f"malformed block string {text!r}: unknown field {part!r}")
        if name in fields:
            raise ValueError(f"malformed block string {text!r}: field {name!r} given twice")
        fields[name] = match.group(2)
    required = ("r", "k", "s", "e", "i", "o")
    missing = [k for k in required if k not in fields]
    if missing:
        raise ValueError(f"malformed block string {text!r}: missing fields {missing}")
    positive = [k for k in required if float(fields[k]) < 1]
    if positive:
        raise ValueError(f"malformed block string {text!r}: {positive} must be at least 1")
    return BlockString(
        num_repeat=int(fields["r"]),
        kernel_size=int(fields["k"]),
        stride=int(fields["s"][0]),
        expand_ratio=int(fields["e"]),
        input_filters=int(fields["i"]),
        output_filters=int(fields["o"]),
        se_ratio=float(fields.get("se", 0.0)),
        id_skip=id_skip,
    )


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """EfficientNet channel rounding: nearest multiple of 8, never below 90% of the target."""
    if not width:
        return filters
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    if not depth:
        return repeats
    return int(math.ceil(depth * repeats))


def scaled_image_size(input_size: int, resolution: float) -> int:
    """The original squares its resolution coefficient: 1.4 -> round(1.96, 2) -> ceil(32*1.96)."""
    return int(math.ceil(input_size * round(resolution**2, 2)))


def same_padding(size_in: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'same' padding (before, after) for an input of `size_in` pixels."""
    size_out = -(-size_in // stride)
    total = max((size_out - 1) * stride + kernel - size_in, 0)
    return total // 2, total - total // 2


def conv_output_size(size_in: int, kernel: int, stride: int, padding: tuple[int, int]) -> int:
    return (size_in + padding[0] + padding[1] - kernel) // stride + 1


def build_architecture(
    block_strings: Sequence[str] = BASE_BLOCK_STRINGS,
    width: float = WIDTH_COEFFICIENT,
    depth: float = DEPTH_COEFFICIENT,
    resolution: float = RESOLUTION_COEFFICIENT,
    head_filters: int = BASE_HEAD_FILTERS,
    num_classes: int = 100,
    input_size: int = CIFAR_IMAGE_SIZE,
    drop_connect_rate: float = DROP_CONNECT_RATE,
    dropout_rate: float = DROPOUT_RATE,
    exit_block: int | None = None,
) -> Architecture:
    """Scale the base block strings into the concrete network."""
    decoded = [decode_block_string(s) for s in block_strings]
    if not decoded:
        raise ValueError("at least one block string is needed")
    image_size = scaled_image_size(input_size, resolution)
    stem_filters = round_filters(decoded[0].input_filters, width)
    stem_pad = same_padding(input_size, 3, 2)
    stem_size = conv_output_size(image_size, 3, 2, stem_pad)

    expanded: list[tuple[BlockString, int, int, int]] = []  # (args, in, out, stride)
    for args in decoded:
        in_f = round_filters(args.input_filters, width)
        out_f = round_filters(args.output_filters, width)
        for r in range(round_repeats(args.num_repeat, depth)):
            if r == 0:
                expanded.append((args, in_f, out_f, args.stride))
            else:
                expanded.append((args, out_f, out_f, 1))

    blocks: list[BlockSpec] = []
    size = stem_size
    for index, (args, in_f, out_f, stride) in enumerate(expanded):
        pad = same_padding(input_size, args.kernel_size, stride)
        out_size = conv_output_size(size, args.kernel_size, stride, pad)
        has_skip = args.id_skip and stride == 1 and in_f == out_f
        se_filters = max(1, int(in_f * args.se_ratio)) if args.se_ratio > 0 else 0
        blocks.append(
            BlockSpec(
                index=index,
                kernel_size=args.kernel_size,
                stride=stride,
                expand_ratio=args.expand_ratio,
                input_filters=in_f,
                output_filters=out_f,
                se_filters=se_filters,
                has_skip=has_skip,
                drop_connect_rate=drop_connect_rate * index / len(expanded) if has_skip else 0.0,
                input_size=size,
                output_size=out_size,
            )
        )
        size = out_size

    arch = Architecture(
        input_size=input_size,
        image_size=image_size,
        pad_reference_size=input_size,
        stem_filters=stem_filters,
        stem_size=stem_size,
        blocks=tuple(blocks),
        head_filters=round_filters(head_filters, width),
        num_classes=num_classes,
        dropout_rate=dropout_rate,
    )
    return arch.with_exit_head(exit_block)


def conv_padding(arch: Architecture, kernel: int, stride: int) -> tuple[int, int]:
    """Padding of every conv: TF 'same' for the reference size, whatever the real input size."""
    return same_padding(arch.pad_reference_size, kernel, stride)
