"""MicroNet Challenge counter, walking the same `Architecture` the model is built from.

Score = parameter storage / 36.5M + math ops / 10.49B, both in 32-bit units. While nothing is
quantised below 16 bits, parameters and multiplications count at `param_bits` / `mult_bits`
(16, the freebie: ×0.5); additions always count at 32 bits. With `bits` (a `BitWidths`)
quantising anything below 16 bits, every value and multiplication counts at its real width (the
challenge's rules for quantised entries): a kernel at its weight width, a conv's
multiplications at the wider of its weight and input widths, everything that stays float32
(biases, BN, swish, pooling, the scales themselves) at 32; an integer-quantised kernel stores
one scale per output channel and an integer-quantised input a scale and a zero point per tensor
(per channel for a depthwise conv's input with `BitWidths.depthwise_channels`), each at
`BitWidths.scale_bits` (32, or 16 for float16 scales).

Conventions (each one is needed for all four of the original's published rows to come out):
- A tensor's mask (1 bit per element, n/32 params) is stored only when the tensor is sparse
  (density < 1): the dense exit head of the 0.005784 entry carries no mask.
- `sparsity` applies to every tensor with more than one dimension (stem, expand, depthwise,
  both SE convs, project, head conv, FC); `exit_sparsity` likewise to the exit head's three
  (depthwise, 1×1 expand, FC), each with its own mask. Biases are dense and unmasked.
- BN counted as a bias is a dense bias of the preceding conv (+C params, +1 add per output
  element, unaffected by pruning), in the exit head as well as in the main network.
- The exit head's FC follows the general dense rule (13,600 mults, 13,600 adds). The write-up's
  row booking 13,500 of those adds as mults gives a math score of 0.002752, not 0.002753.
- Residual adds use the block's expanded width (the official counter's quirk).
- The upsample is left out of the first two rows (counting it gives 0.008329 and 0.003149);
  the third comes out either way, and the final-ranking row is exact (0.002803) with it,
  0.002802 without it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from micronet_jax.errors import CheckpointError, ConfigError
from micronet_jax.models.architecture import Architecture, BlockSpec, ExitHeadSpec
from micronet_jax.quant.widths import FULL, INTEGER_BELOW, BitWidths

PARAM_REFERENCE = 36.5e6  # WideResNet-28-10 parameters (32-bit)
MATH_REFERENCE = 10.49e9  # WideResNet-28-10 math operations (32-bit)
ADD_BITS = 32
BASE_BITS = 32
STEM_KERNEL = 3
IMAGE_CHANNELS = 3
SWISH = (3, 1)  # (mults, adds) per element
SIGMOID = (2, 1)
EXIT_PREFIX = "exit_head/"

# (path of a prunable weight tensor, its number of elements) -> density in (0, 1].
DensityFn = Callable[[str, int], float]


@dataclasses.dataclass(frozen=True)
class Cost:
    """Additive counts of one op or a group of ops, and their widths summed."""

    params: float = 0.0  # stored values: kept weights + biases (+ BN when counted as bias)
    mask_bits: float = 0.0
    mults: float = 0.0
    adds: float = 0.0
    param_bits: float = 0.0  # Σ over stored values of the width each is charged at
    mult_bits: float = 0.0  # Σ over multiplications of the width each is charged at

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            *(
                a + b
                for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)
            )
        )


@dataclasses.dataclass(frozen=True)
class Counting:
    """How one count charges a tensor: its density, BN as a bias or not, and its widths."""

    density: DensityFn
    bn_as_bias: bool = False
    bits: BitWidths = BitWidths()
    param_bits: int = 16  # unquantised values while nothing is below 16 bits
    mult_bits: int = 16

    def values(self, count: float, width: int = FULL) -> Cost:
        """`count` stored values of `width` bits (float32 unless given)."""
        charged = width if self.bits.quantised else self.param_bits
        return Cost(params=count, param_bits=count * charged)

    def multiplications(self, count: float, width: int = FULL) -> Cost:
        charged = width if self.bits.quantised else self.mult_bits
        return Cost(mults=count, mult_bits=count * charged)


def total(costs: list[Cost]) -> Cost:
    return sum(costs, Cost())


@dataclasses.dataclass(frozen=True)
class LayerCount:
    """One table row. `mults`/`adds` are means per test image: `share` of images run it."""

    name: str
    params: float
    mults: float
    adds: float
    mask_bits: float = 0.0
    share: float = 1.0
    param_bits: float | None = None  # Σ widths of the stored values (default 16 each)
    mult_bits: float | None = None  # Σ widths of the multiplications (default 16 each)

    @property
    def math_ops(self) -> float:
        return self.mults + self.adds

    @property
    def storage(self) -> float:
        """Parameter storage in 32-bit units: values at their widths, masks at 1 bit."""
        bits = self.params * 16 if self.param_bits is None else self.param_bits
        return (bits + self.mask_bits) / BASE_BITS

    @property
    def math_storage(self) -> float:
        """Math operations in 32-bit units: mults at their widths, adds at 32 bits."""
        bits = self.mults * 16 if self.mult_bits is None else self.mult_bits
        return (bits + self.adds * ADD_BITS) / BASE_BITS

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"math_ops": self.math_ops}


@dataclasses.dataclass(frozen=True)
class MicroNetCount:
    """A full count: per-layer rows and the challenge scores derived from them."""

    layers: tuple[LayerCount, ...]
    widths: str = "16-bit (nothing quantised below 16 bits: the freebie)"

    @property
    def params(self) -> float:
        return sum(layer.params for layer in self.layers)

    @property
    def mask_bits(self) -> float:
        return sum(layer.mask_bits for layer in self.layers)

    @property
    def mults(self) -> float:
        return sum(layer.mults for layer in self.layers)

    @property
    def adds(self) -> float:
        return sum(layer.adds for layer in self.layers)

    @property
    def math_ops(self) -> float:
        return self.mults + self.adds

    @property
    def param_storage(self) -> float:
        """In 32-bit parameters: values at their widths, masks at 1 bit per element."""
        return sum(layer.storage for layer in self.layers)

    @property
    def math_storage(self) -> float:
        """Math ops in 32-bit units: mults at their widths, adds at 32 bits."""
        return sum(layer.math_storage for layer in self.layers)

    @property
    def param_score(self) -> float:
        return self.param_storage / PARAM_REFERENCE

    @property
    def math_score(self) -> float:
        return self.math_storage / MATH_REFERENCE

    @property
    def score(self) -> float:
        return self.param_score + self.math_score

    def layer(self, name: str) -> LayerCount:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary: rows, totals and the three scores."""
        return {
            "layers": [layer.to_dict() for layer in self.layers],
            "params": self.params,
            "mask_bits": self.mask_bits,
            "mults": self.mults,
            "adds": self.adds,
            "math_ops": self.math_ops,
            "param_storage": self.param_storage,
            "math_storage": self.math_storage,
            "widths": self.widths,
            "param_score": self.param_score,
            "math_score": self.math_score,
            "score": self.score,
        }


# --- single ops ---------------------------------------------------------------------------


def conv(
    rules: Counting,
    path: str,
    *,
    kernel: int,
    inputs: int,
    c_out: int,
    out_size: int,
    bias: bool = False,
    activation: tuple[int, int] | None = None,
    bn: bool = True,
) -> Cost:
    """A conv whose outputs each see kernel²·inputs weights (inputs = 1 for depthwise).

    A dense layer is the 1×1 case on a 1×1 map. Its kernel may be sparse; a bias (its own,
    or the following BN counted as one) is dense and costs one add per output element. Its
    multiplications run at the wider of its weight and input widths.
    """
    n_weights = kernel * kernel * inputs * c_out
    d = rules.density(path, n_weights)
    n_out = out_size * out_size * c_out
    vector = kernel * kernel * inputs * d
    weight_bits, input_bits = rules.bits.of(path)
    cost = rules.values(n_weights * d, weight_bits) + rules.multiplications(
        vector * n_out, max(weight_bits, input_bits)
    )
    cost += Cost(mask_bits=float(n_weights) if d < 1 else 0.0, adds=(vector - 1) * n_out)
    scale_bits = rules.bits.scale_bits
    if weight_bits < INTEGER_BELOW:  # one scale per output channel
        cost += rules.values(c_out, scale_bits)
    if input_bits < INTEGER_BELOW:  # each input grid: a scale and a zero point
        grids = rules.bits.input_grids(path, c_out)  # depthwise: c_in = c_out
        cost += rules.values(2 * grids, scale_bits)
    n_biases = int(bias) + int(bn and rules.bn_as_bias)
    cost += rules.values(n_biases * c_out) + Cost(adds=n_biases * n_out)
    if activation is not None:
        cost += rules.multiplications(activation[0] * n_out) + Cost(adds=activation[1] * n_out)
    return cost


def global_pool(rules: Counting, size: int, channels: int) -> Cost:
    return rules.multiplications(channels) + Cost(adds=(size * size - 1) * channels)


# --- layers -------------------------------------------------------------------------------


def upsample_cost(arch: Architecture, rules: Counting) -> Cost:
    """Nearest upsample: one op per output element (the original's 63·63·3 = 11,907)."""
    if arch.image_size == arch.input_size:
        return Cost()
    return rules.multiplications(arch.image_size * arch.image_size * IMAGE_CHANNELS)


def stem_cost(arch: Architecture, rules: Counting) -> Cost:
    return conv(
        rules,
        "stem_conv/kernel",
        kernel=STEM_KERNEL,
        inputs=IMAGE_CHANNELS,
        c_out=arch.stem_filters,
        out_size=arch.stem_size,
        activation=SWISH,
    )


def block_cost(block: BlockSpec, rules: Counting) -> Cost:
    """MBConv: [expand], depthwise, squeeze-excite, project, [residual add]."""
    prefix = f"blocks_{block.index}/"
    mid, size = block.mid_filters, block.output_size
    costs = []
    if block.has_expand:
        costs.append(
            conv(
                rules,
                prefix + "expand_conv/kernel",
                kernel=1,
                inputs=block.input_filters,
                c_out=mid,
                out_size=block.input_size,
                activation=SWISH,
            )
        )
    costs.append(
        conv(
            rules,
            prefix + "depthwise_conv/kernel",
            kernel=block.kernel_size,
            inputs=1,
            c_out=mid,
            out_size=size,
            activation=SWISH,
        )
    )
    if block.se_filters:
        costs.append(se_cost(rules, prefix, mid, block.se_filters, size))
    costs.append(
        conv(
            rules,
            prefix + "project_conv/kernel",
            kernel=1,
            inputs=mid,
            c_out=block.output_filters,
            out_size=size,
        )
    )
    if block.has_skip:
        costs.append(Cost(adds=size * size * mid))  # expanded width: the official quirk
    return total(costs)


def se_cost(rules: Counting, prefix: str, channels: int, reduced: int, size: int) -> Cost:
    """Pool, 1×1 reduce (bias, swish), 1×1 expand (bias, sigmoid), scale the map."""
    common = dict(kernel=1, out_size=1, bias=True, bn=False)
    reduce = conv(
        rules, prefix + "se_reduce/kernel", inputs=channels, c_out=reduced, activation=SWISH,
        **common,
    )  # fmt: skip
    expand = conv(
        rules, prefix + "se_expand/kernel", inputs=reduced, c_out=channels, activation=SIGMOID,
        **common,
    )  # fmt: skip
    scale = rules.multiplications(size * size * channels)
    return global_pool(rules, size, channels) + reduce + expand + scale


def head_cost(arch: Architecture, rules: Counting) -> Cost:
    return conv(
        rules,
        "head_conv/kernel",
        kernel=1,
        inputs=arch.blocks[-1].output_filters,
        c_out=arch.head_filters,
        out_size=arch.final_size,
        activation=SWISH,
    )


def dense_cost(rules: Counting, path: str, c_in: int, c_out: int) -> Cost:
    return conv(rules, path, kernel=1, inputs=c_in, c_out=c_out, out_size=1, bias=True, bn=False)


def exit_head_cost(spec: ExitHeadSpec, num_classes: int, rules: Counting) -> Cost:
    """Depthwise, BN, swish, 1×1 expand, BN, swish, pool, FC."""
    depthwise = conv(
        rules,
        EXIT_PREFIX + "depthwise_conv/kernel",
        kernel=spec.kernel_size,
        inputs=1,
        c_out=spec.input_filters,
        out_size=spec.size,
        activation=SWISH,
    )
    expand = conv(
        rules,
        EXIT_PREFIX + "expand_conv/kernel",
        kernel=1,
        inputs=spec.input_filters,
        c_out=spec.head_filters,
        out_size=spec.size,
        activation=SWISH,
    )
    pool = global_pool(rules, spec.size, spec.head_filters)
    fc = dense_cost(rules, EXIT_PREFIX + "fc/kernel", spec.head_filters, num_classes)
    return depthwise + expand + pool + fc


def layer_costs(
    arch: Architecture, rules: Counting, include_upsample: bool
) -> list[tuple[str, Cost]]:
    """Every row of the table, in network order, exit head last."""
    rows = []
    if include_upsample:
        rows.append(("upsample", upsample_cost(arch, rules)))
    rows.append(("stem", stem_cost(arch, rules)))
    rows += [(f"block_{b.index}", block_cost(b, rules)) for b in arch.blocks]
    rows.append(("head", head_cost(arch, rules)))
    rows.append(("pool", global_pool(rules, arch.final_size, arch.head_filters)))
    rows.append(("fc", dense_cost(rules, "fc/kernel", arch.head_filters, arch.num_classes)))
    if arch.exit_head is not None:
        rows.append(("exit_head", exit_head_cost(arch.exit_head, arch.num_classes, rules)))
    return rows


def runs_after_exit(arch: Architecture, name: str) -> bool:
    """Whether a row belongs to the part of the network that exiting samples skip."""
    if arch.exit_head is None:
        return False
    if name in ("head", "pool", "fc"):
        return True
    return name.startswith("block_") and int(name[6:]) > arch.exit_head.after_block


# --- densities ----------------------------------------------------------------------------


def uniform_density(sparsity: float, exit_sparsity: float = 0.0) -> DensityFn:
    """The original's convention: one global fraction for every prunable tensor."""

    def density(path: str, n_weights: int) -> float:
        return 1.0 - (exit_sparsity if path.startswith(EXIT_PREFIX) else sparsity)

    return density


def _lookup(tree: Mapping[str, Any], path: str) -> Any:
    node: Any = tree
    for key in path.split("/"):
        if not isinstance(node, Mapping) or key not in node:
            raise CheckpointError(f"the params tree has no {path!r} (the counter needs it)")
        node = node[key]
    return node


def _unwrap_params(tree: Mapping[str, Any]) -> Mapping[str, Any]:
    """Accept the params tree itself or the variables dict holding it."""
    if "params" in tree and "stem_conv" not in tree:
        return tree["params"]
    return tree


def actual_density(params: Mapping[str, Any]) -> DensityFn:
    """Each tensor's real density: its share of nonzero weights (pruned weights are zeros)."""
    tree = _unwrap_params(params)

    def density(path: str, n_weights: int) -> float:
        values = np.asarray(_lookup(tree, path))
        if values.size != n_weights:
            raise CheckpointError(
                f"{path} has {values.size} weights (shape {values.shape}) but the "
                f"architecture needs {n_weights}: the params do not fit the architecture"
            )
        return np.count_nonzero(values) / n_weights

    return density


def prunable_tensors(arch: Architecture) -> list[tuple[str, int]]:
    """(path, elements) of every tensor with more than one dimension, exit head included."""
    seen: list[tuple[str, int]] = []

    def record(path: str, n_weights: int) -> float:
        seen.append((path, n_weights))
        return 1.0

    layer_costs(arch, Counting(record), include_upsample=False)
    return seen


def measured_sparsity(arch: Architecture, params: Mapping[str, Any]) -> tuple[float, float]:
    """Global sparsity of the main network and of the exit head (0 without one)."""
    density = actual_density(params)
    zeros = {True: 0.0, False: 0.0}
    sizes = {True: 0, False: 0}
    for path, n in prunable_tensors(arch):
        is_exit = path.startswith(EXIT_PREFIX)
        zeros[is_exit] += n * (1.0 - density(path, n))
        sizes[is_exit] += n
    exit_sparsity = zeros[True] / sizes[True] if sizes[True] else 0.0
    return zeros[False] / sizes[False], exit_sparsity


# --- the counter --------------------------------------------------------------------------


def _check_fraction(name: str, value: float, *, upper_inclusive: bool) -> None:
    upper_ok = value <= 1 if upper_inclusive else value < 1
    if not (0 <= value and upper_ok):
        bound = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise ConfigError(f"{name} must be in {bound}, got {value}")


def _check_options(
    arch: Architecture,
    sparsity: float,
    params: Mapping[str, Any] | None,
    exit_ratio: float | None,
    exit_sparsity: float,
    param_bits: int,
    mult_bits: int,
) -> None:
    _check_fraction("sparsity", sparsity, upper_inclusive=False)
    _check_fraction("exit_sparsity", exit_sparsity, upper_inclusive=False)
    if params is not None and (sparsity or exit_sparsity):
        raise ConfigError("give either a params tree (actual masks) or a uniform sparsity")
    if exit_ratio is not None:
        _check_fraction("exit_ratio", exit_ratio, upper_inclusive=True)
        if arch.exit_head is None:
            raise ConfigError("exit_ratio needs an architecture with an exit head (exit block)")
    if exit_sparsity and arch.exit_head is None:
        raise ConfigError("exit_sparsity needs an architecture with an exit head (exit block)")
    for name, bits in (("param_bits", param_bits), ("mult_bits", mult_bits)):
        if not 1 <= bits <= BASE_BITS:
            raise ConfigError(f"{name} must be in [1, {BASE_BITS}], got {bits}")


def count_micronet(
    arch: Architecture,
    *,
    sparsity: float = 0.0,
    params: Mapping[str, Any] | None = None,
    bn_as_bias: bool = False,
    include_upsample: bool = False,
    exit_ratio: float | None = None,
    exit_sparsity: float = 0.0,
    param_bits: int = 16,
    mult_bits: int = 16,
    bits: BitWidths | None = None,
) -> MicroNetCount:
    """Count `arch` by the MicroNet rules.

    Sparsity is `uniform` (`sparsity` for the main network, `exit_sparsity` for the exit
    head) unless `params` is given: then each tensor's real density is read from it. With an
    exit head, a share `exit_ratio` of images (0 if None) skips the layers after the exit
    block: ops = r·(exit path) + (1−r)·(full path), both paths running the exit head.
    `param_bits`/`mult_bits` are the widths everything counts at while nothing is quantised
    (16: the freebie; 32: plain float32); `bits` quantises weights and activations.
    """
    _check_options(arch, sparsity, params, exit_ratio, exit_sparsity, param_bits, mult_bits)
    density = (
        actual_density(params) if params is not None else uniform_density(sparsity, exit_sparsity)
    )
    bits = bits or BitWidths()
    rules = Counting(density, bn_as_bias, bits, param_bits, mult_bits)
    ratio = exit_ratio or 0.0
    layers = []
    for name, cost in layer_costs(arch, rules, include_upsample):
        share = 1.0 - ratio if runs_after_exit(arch, name) else 1.0
        layers.append(
            LayerCount(
                name=name,
                params=cost.params,
                mults=cost.mults * share,
                adds=cost.adds * share,
                mask_bits=cost.mask_bits,
                share=share,
                param_bits=cost.param_bits,
                mult_bits=cost.mult_bits * share,
            )
        )
    if bits.quantised:
        widths = bits.describe()
    elif (param_bits, mult_bits) == (16, 16):
        widths = bits.describe()
    else:
        widths = f"params {param_bits}-bit, mults {mult_bits}-bit (nothing quantised)"
    return MicroNetCount(tuple(layers), widths=widths)
