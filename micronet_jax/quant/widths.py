"""Which bit widths a quantised entry stores and multiplies at, tensor by tensor.

One `BitWidths` is read by both the fake quantisation (what the network computes) and the
MicroNet counter (what it is charged), so the two cannot disagree. Widths are given for the
weights of every conv and dense layer and for the activations entering them, with overrides
by parameter-path prefix (e.g. keep the stem's input and the classifier at 8 or 32 bits).
A depthwise conv's input may have a grid per channel (`depthwise_channels`): each output
channel sees one input channel, so its per-channel input scale folds into the per-channel
rescale of integer arithmetic, at the cost of a scale and a zero point per channel.
Scales and zero points are stored at `scale_bits` (32, or 16: float16 scales, which the fake
quantisation then rounds to, so the evaluation is of what is counted).

The MicroNet Challenge's rules for quantised entries: the 16-bit freebie (everything counted at
16 bits) holds only while nothing is below 16 bits; quantise anything below and every value and
multiplication counts at its real width, 32 for what stays in float32.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from micronet_jax.errors import ConfigError

WIDTHS_FORMAT = "micronet_jax/bit_widths/1"  # the width file's "format" entry
FULL = 32  # float32: not quantised
FREEBIE = 16  # what every width counts as while nothing is below 16 bits
INTEGER_BELOW = 16  # widths under this are integer grids with a scale (16 is fp16, exact)
SCALE_WIDTHS = (16, 32)  # scales and zero points: float16 or float32


@dataclasses.dataclass(frozen=True)
class BitWidths:
    """Default weight and activation widths, and (prefix, weights, activations) overrides;
    the longest matching prefix wins."""

    weights: int = FULL
    activations: int = FULL
    overrides: tuple[tuple[str, int, int], ...] = ()
    depthwise_channels: bool = True  # depthwise inputs: a grid per channel, not per tensor
    scale_bits: int = FULL  # width of every scale and zero point (float32 or float16)

    def __post_init__(self) -> None:
        for bits in (self.weights, self.activations, *(b for o in self.overrides for b in o[1:])):
            if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= FULL:
                raise ConfigError(f"bit widths must be integers in [2, {FULL}], got {bits!r}")
        if self.scale_bits not in SCALE_WIDTHS:
            raise ConfigError(
                f"scale widths must be one of {SCALE_WIDTHS}, got {self.scale_bits!r}"
            )

    def of(self, path: str) -> tuple[int, int]:
        """(weight bits, input activation bits) of the layer whose kernel is at `path`."""
        best, widths = -1, (self.weights, self.activations)
        for prefix, weights, activations in self.overrides:
            if path.startswith(prefix) and len(prefix) > best:
                best, widths = len(prefix), (weights, activations)
        return widths

    @property
    def quantised(self) -> bool:
        """Whether anything is below 16 bits (then the freebie is gone)."""
        widths = [self.weights, self.activations, *(b for o in self.overrides for b in o[1:])]
        return min(widths) < FREEBIE

    def input_grids(self, path: str, channels: int) -> int:
        """How many affine grids the input of the layer at `path` (with `channels` input
        channels) is quantised on: one per channel for depthwise convs, else one."""
        return channels if self.depthwise_channels and is_depthwise(path) else 1

    def counted(self, bits: int) -> int:
        """The width a value or multiplication of `bits` is charged at."""
        return bits if self.quantised else FREEBIE

    def describe(self) -> str:
        if not self.quantised:
            return "16-bit (nothing quantised below 16 bits: the freebie)"
        text = f"weights {self.weights}-bit, activations {self.activations}-bit"
        for prefix, w, a in self.overrides:
            text += f", {prefix} {w}/{a}"
        if self.activations < INTEGER_BELOW or any(a < INTEGER_BELOW for *_, a in self.overrides):
            text += "; depthwise inputs per " + ("channel" if self.depthwise_channels else "tensor")
        if self.scale_bits != FULL:
            text += f"; scales {self.scale_bits}-bit"
        return text


def is_depthwise(path: str) -> bool:
    """Whether the kernel at `path` is a depthwise conv's (the model's naming)."""
    return "depthwise_conv" in path


def parse_override(text: str) -> tuple[str, int, int]:
    """'stem_conv=8' or 'fc=8,32' (weights, activations) -> ('stem_conv', 8, 32)."""
    match = re.fullmatch(r"([\w/]+)=(\d+)(?:,(\d+))?", text.strip())
    if not match:
        raise ConfigError(
            f"a bit-width override reads PREFIX=BITS or PREFIX=WEIGHT_BITS,ACTIVATION_BITS "
            f"(e.g. stem_conv=8 or fc=8,32), got {text!r}"
        )
    prefix, weights, activations = match.groups()
    return prefix, int(weights), int(activations or weights)


QUANTISED_WIDTHS = range(2, 9)  # widths a code fits in int8 (kernels) and uint8 (inputs)


def parse_bits(
    text: str,
    overrides: Sequence[str] = (),
    scale_bits: int = FULL,
    widths: range = QUANTISED_WIDTHS,
) -> BitWidths:
    """'WxA' (weights x activations, each in `widths`; a depthwise conv's input on a grid
    per channel), 'WxA/channel' (the same, said) or 'WxA/tensor' (one grid per depthwise
    input), with `overrides` such as 'stem_conv=8,32'; scales at `scale_bits`. Or the path
    of a width file (`save_widths`), whose own scale width holds."""
    if text.endswith(".json") or Path(text).is_file():
        bits = load_widths(text)
        if scale_bits not in (FULL, bits.scale_bits):
            raise ConfigError(
                f"--scale_bits {scale_bits}: the width file {text} stores its scales at "
                f"{bits.scale_bits} bits"
            )
        return bits
    pair, _, grids = text.partition("/")
    weights, _, activations = pair.partition("x")
    if (
        grids not in ("", "channel", "tensor")
        or not weights.isdigit()
        or not activations.isdigit()
        or int(weights) not in widths
        or int(activations) not in widths
    ):
        raise ConfigError(
            f"--bits {text!r}: expected WxA, WxA/channel or WxA/tensor with W and A in "
            f"{widths.start}..{widths.stop - 1} (e.g. 8x8, 6x6, 4x8)"
        )
    parsed = tuple(parse_override(o) for o in overrides)
    return BitWidths(int(weights), int(activations), parsed, grids != "tensor", scale_bits)


def bit_widths(
    weights: int = FULL,
    activations: int = FULL,
    overrides: Sequence[str] = (),
    depthwise_channels: bool = True,
    scale_bits: int = FULL,
) -> BitWidths:
    """A `BitWidths` from command-line style values."""
    parsed = tuple(parse_override(o) for o in overrides)
    return BitWidths(weights, activations, parsed, depthwise_channels, scale_bits)


def widths_to_dict(bits: BitWidths) -> dict[str, Any]:
    """The width file's content: defaults, then one entry per overridden layer prefix."""
    return {
        "format": WIDTHS_FORMAT,
        "weights": bits.weights,
        "activations": bits.activations,
        "depthwise_channels": bits.depthwise_channels,
        "scale_bits": bits.scale_bits,
        "layers": {prefix: [w, a] for prefix, w, a in bits.overrides},
    }


def widths_from_dict(data: dict[str, Any], source: str = "widths") -> BitWidths:
    """The inverse of `widths_to_dict`, with one-line errors naming `source`."""
    if not isinstance(data, dict) or data.get("format") != WIDTHS_FORMAT:
        raise ConfigError(f"{source}: not a width file (its format is not {WIDTHS_FORMAT!r})")
    try:
        layers = data.get("layers", {})
        overrides = tuple((prefix, int(w), int(a)) for prefix, (w, a) in layers.items())
        return BitWidths(
            int(data["weights"]),
            int(data["activations"]),
            overrides,
            bool(data.get("depthwise_channels", True)),
            int(data.get("scale_bits", FULL)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: malformed width file ({exc!r})") from None
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def save_widths(path: str | Path, bits: BitWidths) -> Path:
    """Write `bits` as a width file (JSON) that `load_widths`, the export's `--bits` and
    `config.quant.widths_file` read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(widths_to_dict(bits), indent=2) + "\n")
    return path


def load_widths(path: str | Path) -> BitWidths:
    """A width file written by `save_widths` (or by hand)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no width file at {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not JSON ({exc.msg}, line {exc.lineno})") from None
    return widths_from_dict(data, str(path))
