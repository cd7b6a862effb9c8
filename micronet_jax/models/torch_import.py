"""Convert the original's PyTorch checkpoints into this package's flax variables.

The whole checkpoint is checked against the layout that `Architecture` predicts before
anything is built, so a file from another network fails with one message naming the first
bad key instead of loading half-way. PyTorch keeps conv weights as O×I×kH×kW and dense
weights as (out, in); flax wants H×W×I×O and (in, out). Ghost BN stores one set of running
statistics per split (4·C entries); evaluation uses their mean, as the original's ghost BN
does when it switches to eval mode (the released files hold 4 identical copies).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from micronet_jax.errors import CheckpointError
from micronet_jax.models.architecture import Architecture, build_architecture
from micronet_jax.models.efficientnet import MicroNet
from micronet_jax.models.torch_pickle import load_state_dict

DEFAULT_EXIT_BLOCK = 4
INFO_FILENAME = "model_info.json"
EXIT_PREFIX = "_exit."

# How a torch tensor becomes a flax leaf.
CONV = "conv"  # O×I×kH×kW -> kH×kW×I×O (depthwise O×1×kH×kW -> kH×kW×1×O)
DENSE = "dense"  # (out, in) -> (in, out)
CONV_AS_DENSE = "conv_as_dense"  # a 1×1 conv classifier (out, in, 1, 1) -> (in, out)
VECTOR = "vector"  # biases, BN scale and shift: unchanged
BN_STAT = "bn_stat"  # ghost BN running stats: splits·C -> C (mean over splits)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One expected checkpoint tensor and where it lands in the flax variables."""

    key: str
    shape: tuple[int, ...]  # torch shape
    path: tuple[str, ...]  # ('params' | 'batch_stats', module..., leaf)
    kind: str


@dataclasses.dataclass(frozen=True)
class ConvertedCheckpoint:
    """A loaded original checkpoint, ready for `model.apply(variables, x)`."""

    arch: Architecture
    model: MicroNet
    variables: dict[str, Any]  # {'params': ..., 'batch_stats': ...}
    masks: dict[str, Any]  # params-shaped: 1.0 where a prunable weight is kept
    info: dict[str, Any] | None  # model_info.json beside the checkpoint, if any


def _conv(key: str, module: tuple[str, ...], out: int, inp: int, k: int) -> TensorSpec:
    return TensorSpec(key, (out, inp, k, k), ("params", *module, "kernel"), CONV)


def _bias(key: str, module: tuple[str, ...], n: int) -> TensorSpec:
    return TensorSpec(key, (n,), ("params", *module, "bias"), VECTOR)


def _bn(prefix: str, module: tuple[str, ...], c: int, splits: int) -> list[TensorSpec]:
    return [
        TensorSpec(f"{prefix}.weight", (c,), ("params", *module, "scale"), VECTOR),
        TensorSpec(f"{prefix}.bias", (c,), ("params", *module, "bias"), VECTOR),
        TensorSpec(
            f"{prefix}.running_mean", (splits * c,), ("batch_stats", *module, "mean"), BN_STAT
        ),
        TensorSpec(
            f"{prefix}.running_var", (splits * c,), ("batch_stats", *module, "var"), BN_STAT
        ),
    ]


def _stem_and_blocks(arch: Architecture, splits: int) -> Iterator[TensorSpec]:
    yield _conv("_conv_stem.weight", ("stem_conv",), arch.stem_filters, 3, 3)
    yield from _bn("_bn0", ("stem_bn",), arch.stem_filters, splits)
    for b in arch.blocks:
        p, m = f"_blocks.{b.index}.", f"blocks_{b.index}"
        if b.has_expand:
            yield _conv(
                p + "_expand_conv.weight", (m, "expand_conv"), b.mid_filters, b.input_filters, 1
            )
            yield from _bn(p + "_bn0", (m, "bn0"), b.mid_filters, splits)
        yield _conv(p + "_conv.weight", (m, "depthwise_conv"), b.mid_filters, 1, b.kernel_size)
        yield from _bn(p + "_bn1", (m, "bn1"), b.mid_filters, splits)
        if b.se_filters:
            yield _conv(p + "_se_reduce.weight", (m, "se_reduce"), b.se_filters, b.mid_filters, 1)
            yield _bias(p + "_se_reduce.bias", (m, "se_reduce"), b.se_filters)
            yield _conv(p + "_se_expand.weight", (m, "se_expand"), b.mid_filters, b.se_filters, 1)
            yield _bias(p + "_se_expand.bias", (m, "se_expand"), b.mid_filters)
        yield _conv(
            p + "_project_conv.weight", (m, "project_conv"), b.output_filters, b.mid_filters, 1
        )
        yield from _bn(p + "_bn2", (m, "bn2"), b.output_filters, splits)


def _head(arch: Architecture, splits: int) -> Iterator[TensorSpec]:
    last = arch.blocks[-1].output_filters
    yield _conv("_conv_head.weight", ("head_conv",), arch.head_filters, last, 1)
    yield from _bn("_bn1", ("head_bn",), arch.head_filters, splits)
    fc = (arch.num_classes, arch.head_filters)
    yield TensorSpec("_fc.weight", fc, ("params", "fc", "kernel"), DENSE)
    yield _bias("_fc.bias", ("fc",), arch.num_classes)


def _exit_head(arch: Architecture, splits: int) -> Iterator[TensorSpec]:
    spec = arch.exit_head
    if spec is None:
        return
    c, h, m = spec.input_filters, spec.head_filters, "exit_head"
    yield _conv("_exit._depthwise_conv.weight", (m, "depthwise_conv"), c, 1, spec.kernel_size)
    yield from _bn("_exit._bn0", (m, "bn0"), c, splits)
    yield _conv("_exit._expand_conv.weight", (m, "expand_conv"), h, c, 1)
    yield from _bn("_exit._bn1", (m, "bn1"), h, splits)
    fc = (arch.num_classes, h, 1, 1)
    yield TensorSpec("_exit._fc.weight", fc, ("params", m, "fc", "kernel"), CONV_AS_DENSE)
    yield _bias("_exit._fc.bias", (m, "fc"), arch.num_classes)


def checkpoint_layout(arch: Architecture, bn_splits: int = 4) -> list[TensorSpec]:
    """Every tensor the original's `state_dict` holds for `arch`, in its key order."""
    return [
        *_stem_and_blocks(arch, bn_splits),
        *_head(arch, bn_splits),
        *_exit_head(arch, bn_splits),
    ]


def _optional_keys(layout: list[TensorSpec]) -> dict[str, tuple[int, ...]]:
    """Keys that may be present and carry nothing we need: BN step counters, pruning masks."""
    optional: dict[str, tuple[int, ...]] = {}
    for spec in layout:
        stem = spec.key.rsplit(".", 1)[0]
        if spec.kind == BN_STAT:
            optional[f"{stem}.num_batches_tracked"] = ()
        elif len(spec.shape) > 1:
            optional[f"{stem}.mask"] = spec.shape
    return optional


def validate_state_dict(
    state_dict: Mapping[str, np.ndarray], arch: Architecture, bn_splits: int = 4
) -> list[TensorSpec]:
    """Refuse a state dict that does not fit `arch`: missing, unexpected or misshapen keys."""
    layout = checkpoint_layout(arch, bn_splits)
    optional = _optional_keys(layout)
    missing = [spec for spec in layout if spec.key not in state_dict]
    if missing:
        first = missing[0]
        raise CheckpointError(
            f"checkpoint lacks {first.key!r} (expected shape {first.shape}); "
            f"{len(missing)} expected key(s) missing"
        )
    expected = {spec.key for spec in layout}
    extra = [key for key in state_dict if key not in expected and key not in optional]
    if extra:
        raise CheckpointError(f"checkpoint has unexpected keys: {', '.join(extra)}")
    shapes = {spec.key: spec.shape for spec in layout} | optional
    for key, value in state_dict.items():
        found = tuple(np.shape(value))
        if found != shapes[key]:
            raise CheckpointError(f"{key!r} has shape {found}, expected {shapes[key]}")
    for spec in layout:
        if not np.issubdtype(np.asarray(state_dict[spec.key]).dtype, np.floating):
            raise CheckpointError(f"{spec.key!r} is not floating point")
    _check_masks(state_dict)
    return layout


def _check_masks(state_dict: Mapping[str, np.ndarray]) -> None:
    """A saved pruning mask must be 0/1 and zero only where its weight is zero."""
    for key, mask in state_dict.items():
        if not key.endswith(".mask"):
            continue
        mask = np.asarray(mask)
        if not np.all((mask == 0) | (mask == 1)):
            raise CheckpointError(f"{key!r} is not a 0/1 mask")
        weight = np.asarray(state_dict[key[: -len("mask")] + "weight"])
        if np.any((mask == 0) & (weight != 0)):
            raise CheckpointError(f"{key!r} masks weights that are not zero")


def _to_flax(value: np.ndarray, kind: str, bn_splits: int) -> np.ndarray:
    value = np.asarray(value, np.float32)
    if kind == CONV:
        return value.transpose(2, 3, 1, 0)
    if kind == DENSE:
        return value.T
    if kind == CONV_AS_DENSE:
        return value[:, :, 0, 0].T
    if kind == BN_STAT:
        splits = value.reshape(bn_splits, -1).astype(np.float64)
        return splits.mean(axis=0).astype(np.float32)
    return value


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray], arch: Architecture, bn_splits: int = 4
) -> dict[str, Any]:
    """The original's `state_dict` (numpy arrays) -> {'params', 'batch_stats'} for `arch`."""
    layout = validate_state_dict(state_dict, arch, bn_splits)
    variables: dict[str, Any] = {"params": {}, "batch_stats": {}}
    for spec in layout:
        leaf = _to_flax(state_dict[spec.key], spec.kind, bn_splits)
        _set(variables, spec.path, jnp.asarray(np.ascontiguousarray(leaf)))
    return variables


def pruning_masks(params: Any) -> Any:
    """1.0 where a prunable weight (ndim > 1) is non-zero; 1.0 everywhere on other leaves."""

    def mask(leaf: jax.Array) -> jax.Array:
        value = np.asarray(leaf)  # numpy: one jitted op per leaf shape would be slow
        keep = value != 0 if value.ndim > 1 else np.ones(value.shape, bool)
        return jnp.asarray(keep.astype(np.float32))

    return jax.tree_util.tree_map(mask, params)


def infer_exit_block(
    state_dict: Mapping[str, np.ndarray],
    arch: Architecture,
    info: Mapping[str, Any] | None = None,
) -> int | None:
    """Which block the exit head follows: None without `_exit.*` keys.

    A recorded `exit_block` in model_info.json wins; otherwise the exit head's input
    channels must match exactly one block's output (the original's block 4 when it fits).
    """
    if not any(key.startswith(EXIT_PREFIX) for key in state_dict):
        return None
    if info is not None and isinstance(info.get("exit_block"), int):
        return info["exit_block"]
    weight = state_dict.get("_exit._depthwise_conv.weight")
    if weight is None:
        return DEFAULT_EXIT_BLOCK
    channels = np.shape(weight)[0]
    candidates = [b.index for b in arch.blocks[:-1] if b.output_filters == channels]
    if not candidates or DEFAULT_EXIT_BLOCK in candidates:
        return DEFAULT_EXIT_BLOCK
    if len(candidates) > 1:
        raise CheckpointError(
            f"the exit head's {channels} input channels fit blocks {candidates}; "
            "pass exit_block= to choose"
        )
    return candidates[0]


def read_info(path: str | os.PathLike) -> dict[str, Any] | None:
    """The original's model_info.json next to a checkpoint, or None when there is none."""
    info_path = Path(path).with_name(INFO_FILENAME)
    if not info_path.is_file():
        return None
    try:
        return json.loads(info_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{info_path} is not valid JSON: {exc}") from exc


def load_original(
    path: str | os.PathLike, exit_block: int | None = None, bn_splits: int = 4
) -> ConvertedCheckpoint:
    """Load one of the original's `.pth` checkpoints (legacy or zip) without torch.

    `exit_block` overrides the inferred position of the early-exit head.
    """
    state_dict = load_state_dict(path)
    info = read_info(path)
    base = build_architecture()
    try:
        if exit_block is None:
            exit_block = infer_exit_block(state_dict, base, info)
        arch = base.with_exit_head(exit_block)
        variables = convert_state_dict(state_dict, arch, bn_splits)
    except ValueError as exc:  # CheckpointError included: name the file
        raise CheckpointError(f"{path}: {exc}") from exc
    return ConvertedCheckpoint(
        arch=arch,
        model=MicroNet(arch, bn_splits=bn_splits),
        variables=variables,
        masks=pruning_masks(variables["params"]),
        info=info,
    )
