"""Config -> objects: the architecture, the model and the data sets a run uses."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from micronet_jax.data.cifar import CifarSplit, load_train_test
from micronet_jax.errors import ConfigError
from micronet_jax.models.architecture import Architecture, build_architecture
from micronet_jax.models.efficientnet import MicroNet
from micronet_jax.quant.widths import BitWidths, bit_widths, load_widths

NUM_CLASSES = {"cifar100": 100, "cifar10": 10}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def num_classes_of(data_name: str) -> int:
    if data_name not in NUM_CLASSES:
        raise ConfigError(
            f"unknown data set {data_name!r}: data.name must be one of {sorted(NUM_CLASSES)}"
        )
    return NUM_CLASSES[data_name]


def architecture_from_config(config: Any, with_exit: bool = False) -> Architecture:
    """The scaled architecture of `config.model` for `config.data.name`'s classes."""
    m = config.model
    try:
        arch = build_architecture(
            block_strings=tuple(m.block_strings),
            width=m.width,
            depth=m.depth,
            resolution=m.resolution,
            head_filters=m.head_filters,
            num_classes=m.num_classes or num_classes_of(config.data.name),
            drop_connect_rate=m.drop_connect,
            dropout_rate=m.dropout,
        )
        return arch.with_exit_head(m.exit_block) if with_exit else arch
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"model config: {exc}") from None


def bit_widths_of(config: Any) -> BitWidths:
    """The widths `config.quant` asks for (all 32: no quantisation), or its width file's."""
    q = config.quant
    try:
        if q.get("widths_file"):
            return load_widths(q.widths_file)
        return bit_widths(q.weight_bits, q.activation_bits, tuple(q.keep), q.depthwise_channels)
    except ConfigError as exc:
        raise ConfigError(f"quant: {exc}") from None


def model_from_config(config: Any, arch: Architecture | None = None) -> MicroNet:
    if config.model.dtype not in DTYPES:
        raise ConfigError(
            f"model.dtype must be one of {sorted(DTYPES)}, got {config.model.dtype!r}"
        )
    return MicroNet(
        arch=arch if arch is not None else architecture_from_config(config),
        bn_splits=config.model.bn_splits,
        dtype=DTYPES[config.model.dtype],
        conv_impl=config.model.conv_impl,
    )


def _subset(split: CifarSplit, n: int) -> CifarSplit:
    """A fixed random subset of n images (test sets are often sorted by class)."""
    if not n or n >= len(split):
        return split
    idx = np.sort(np.random.default_rng(0).permutation(len(split))[:n])
    return CifarSplit(
        images=split.images[idx],
        labels=split.labels[idx],
        num_classes=split.num_classes,
        coarse_labels=None if split.coarse_labels is None else split.coarse_labels[idx],
        class_names=split.class_names,
        coarse_class_names=split.coarse_class_names,
        source=split.source,
    )


def load_data(config: Any) -> tuple[CifarSplit, CifarSplit]:
    """Train and test splits of `config.data` (optionally only their first N images)."""
    d = config.data
    num_classes_of(d.name)
    train, test = load_train_test(d.name, d.dir or None, source=d.source, download=d.download)
    return _subset(train, d.num_train), _subset(test, d.num_test)
