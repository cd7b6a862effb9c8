"""MicroNet Challenge counter, walking the same `Architecture` the model is built from.

Score = parameter storage / 36.5M + math ops / 10.49B, both in 32-bit units: parameters and
multiplications at `param_bits` / `mult_bits` (16 → ×0.5), additions always 32-bit.

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
    """Additive counts of one op or a group of ops, before any bit-width scaling."""

    params: float = 0.0  # stored values: kept weights + biases (+ BN when counted as bias)
    mask_bits: float = 0.0
    mults: float = 0.0
    adds: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.params + other.params,
            self.mask_bits + other.mask_bits,
            self.mults + other.mults,
            self.adds + other.adds,
        )


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

    @property
    def math_ops(self) -> float:
        return self.mults + self.adds

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"math_ops": self.math_ops}


@dataclasses.dataclass(frozen=True)
class MicroNetCount:
    """A full count: per-layer rows and the challenge scores derived from them."""

    layers: tuple[LayerCount, ...]
    param_bits: int = 16
    mult_bits: int = 16

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
        """In 32-bit parameters: values at `param_bits`, masks at 1 bit per element."""
        return (self.params * self.param_bits + self.mask_bits) / BASE_BITS

    @property
    def math_storage(self) -> float:
        """Math ops in 32-bit units: mults at `mult_bits`, adds at 32 bits."""
        return (self.mults * self.mult_bits + self.adds * ADD_BITS) / BASE_BITS

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
            "param_score": self.param_score,
            "math_score": self.math_score,
            "score": self.score,
        }


# --- single ops ---------------------------------------------------------------------------


def conv(
    density: DensityFn,
    path: str,
    *,
    kernel: int,
    inputs: int,
    c_out: int,
    out_size: int,
    bias: bool = False,
    bn_as_bias: bool = False,
    activation: tuple[int, int] | None = None,
) -> Cost:
    """A conv whose outputs each see kernel²·inputs weights (inputs = 1 for depthwise).

    A dense layer is the 1×1 case on a 1×1 map. Its kernel may be sparse; a bias (its own,
    or the following BN counted as one) is dense and costs one add per output element.
    """
    n_weights = kernel * kernel * inputs * c_out
    d = density(path, n_weights)
    n_out = out_size * out_size * c_out
    vector = kernel * kernel * inputs * d
    cost = Cost(
        params=n_weights * d,
        mask_bits=float(n_weights) if d < 1 else 0.0,
        mults=vector * n_out,
        adds=(vector - 1) * n_out,
    )
    n_biases = int(bias) + int(bn_as_bias)
    cost += Cost(params=n_biases * c_out, adds=n_biases * n_out)
    if activation is not None:
        cost += Cost(mults=activation[0] * n_out, adds=activation[1] * n_out)
    return cost


def global_pool(size: int, channels: int) -> Cost:
    return Cost(mults=channels, adds=(size * size - 1) * channels)


# --- layers -------------------------------------------------------------------------------


def upsample_cost(arch: Architecture) -> Cost:
    """Nearest upsample: one op per output element (the original's 63·63·3 = 11,907)."""
    if arch.image_size == arch.input_size:
        return Cost()
    return Cost(mults=arch.image_size * arch.image_size * IMAGE_CHANNELS)


def stem_cost(arch: Architecture, density: DensityFn, bn_as_bias: bool) -> Cost:
    return conv(
        density,
        "stem_conv/kernel",
        kernel=STEM_KERNEL,
        inputs=IMAGE_CHANNELS,
        c_out=arch.stem_filters,
        out_size=arch.stem_size,
        bn_as_bias=bn_as_bias,
        activation=SWISH,
    )


def block_cost(block: BlockSpec, density: DensityFn, bn_as_bias: bool) -> Cost:
    """MBConv: [expand], depthwise, squeeze-excite, project, [residual add]."""
    prefix = f"blocks_{block.index}/"
    mid, size = block.mid_filters, block.output_size
    costs = []
    if block.has_expand:
        costs.append(
            conv(
                density,
                prefix + "expand_conv/kernel",
                kernel=1,
                inputs=block.input_filters,
                c_out=mid,
                out_size=block.input_size,
                bn_as_bias=bn_as_bias,
                activation=SWISH,
            )
        )
    costs.append(
        conv(
            density,
            prefix + "depthwise_conv/kernel",
            kernel=block.kernel_size,
            inputs=1,
            c_out=mid,
            out_size=size,
            bn_as_bias=bn_as_bias,
            activation=SWISH,
        )
    )
    if block.se_filters:
        costs.append(se_cost(prefix, mid, block.se_filters, size, density))
    costs.append(
        conv(
            density,
            prefix + "project_conv/kernel",
            kernel=1,
            inputs=mid,
            c_out=block.output_filters,
            out_size=size,
            bn_as_bias=bn_as_bias,
        )
    )
    if block.has_skip:
        costs.append(Cost(adds=size * size * mid))  # expanded width: the official quirk
    return total(costs)


def se_cost(prefix: str, channels: int, reduced: int, size: int, density: DensityFn) -> Cost:
    """Pool, 1×1 reduce (bias, swish), 1×1 expand (bias, sigmoid), scale the map."""
    reduce = conv(
        density,
        prefix + "se_reduce/kernel",
        kernel=1,
        inputs=channels,
        c_out=reduced,
        out_size=1,
        bias=True,
        activation=SWISH,
    )
    expand = conv(
        density,
        prefix + "se_expand/kernel",
        kernel=1,
        inputs=reduced,
        c_out=channels,
        out_size=1,
        bias=True,
        activation=SIGMOID,
    )
    scale = Cost(mults=size * size * channels)
    return global_pool(size, channels) + reduce + expand + scale


def head_cost(arch: Architecture, density: DensityFn, bn_as_bias: bool) -> Cost:
    return conv(
        density,
        "head_conv/kernel",
        kernel=1,
        inputs=arch.blocks[-1].output_filters,
        c_out=arch.head_filters,
        out_size=arch.final_size,
        bn_as_bias=bn_as_bias,
        activation=SWISH,
    )


def dense_cost(density: DensityFn, path: str, c_in: int, c_out: int) -> Cost:
    return conv(density, path, kernel=1, inputs=c_in, c_out=c_out, out_size=1, bias=True)


def exit_head_cost(
    spec: ExitHeadSpec, num_classes: int, density: DensityFn, bn_as_bias: bool
) -> Cost:
    """Depthwise, BN, swish, 1×1 expand, BN, swish, pool, FC."""
    depthwise = conv(
        density,
        EXIT_PREFIX + "depthwise_conv/kernel",
        kernel=spec.kernel_size,
        inputs=1,
        c_out=spec.input_filters,
        out_size=spec.size,
        bn_as_bias=bn_as_bias,
        activation=SWISH,
    )
    expand = conv(
        density,
        EXIT_PREFIX + "expand_conv/kernel",
        kernel=1,
        inputs=spec.input_filters,
        c_out=spec.head_filters,
        out_size=spec.size,
        bn_as_bias=bn_as_bias,
        activation=SWISH,
    )
    pool = global_pool(spec.size, spec.head_filters)
    fc = dense_cost(density, EXIT_PREFIX + "fc/kernel", spec.head_filters, num_classes)
    return depthwise + expand + pool + fc


def layer_costs(
    arch: Architecture, density: DensityFn, bn_as_bias: bool, include_upsample: bool
) -> list[tuple[str, Cost]]:
    """Every row of the table, in network order, exit head last."""
    rows = []
    if include_upsample:
        rows.append(("upsample", upsample_cost(arch)))
    rows.append(("stem", stem_cost(arch, density, bn_as_bias)))
    rows += [(f"block_{b.index}", block_cost(b, density, bn_as_bias)) for b in arch.blocks]
    rows.append(("head", head_cost(arch, density, bn_as_bias)))
    rows.append(("pool", global_pool(arch.final_size, arch.head_filters)))
    rows.append(("fc", dense_cost(density, "fc/kernel", arch.head_filters, arch.num_classes)))
    if arch.exit_head is not None:
        cost = exit_head_cost(arch.exit_head, arch.num_classes, density, bn_as_bias)
        rows.append(("exit_head", cost))
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

    layer_costs(arch, record, bn_as_bias=False, include_upsample=False)
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
) -> MicroNetCount:
    """Count `arch` by the MicroNet rules.

    Sparsity is `uniform` (`sparsity` for the main network, `exit_sparsity` for the exit
    head) unless `params` is given: then each tensor's real density is read from it. With an
    exit head, a share `exit_ratio` of images (0 if None) skips the layers after the exit
    block: ops = r·(exit path) + (1−r)·(full path), both paths running the exit head.
    """
    _check_options(arch, sparsity, params, exit_ratio, exit_sparsity, param_bits, mult_bits)
    density = (
        actual_density(params) if params is not None else uniform_density(sparsity, exit_sparsity)
    )
    ratio = exit_ratio or 0.0
    layers = []
    for name, cost in layer_costs(arch, density, bn_as_bias, include_upsample):
        share = 1.0 - ratio if runs_after_exit(arch, name) else 1.0
        layers.append(
            LayerCount(
                name=name,
                params=cost.params,
                mults=cost.mults * share,
                adds=cost.adds * share,
                mask_bits=cost.mask_bits,
                share=share,
            )
        )
    return MicroNetCount(tuple(layers), param_bits=param_bits, mult_bits=mult_bits)
