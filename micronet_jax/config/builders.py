"""Config -> objects: the architecture, the model, the data sets, and the training options
(schedule, step, fit) a run uses. The one place a config becomes options."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from micronet_jax.data.cifar import CifarSplit, load_train_test
from micronet_jax.data.policy import load_policy
from micronet_jax.errors import ConfigError
from micronet_jax.models.architecture import Architecture, build_architecture
from micronet_jax.models.efficientnet import MicroNet
from micronet_jax.quant.widths import BitWidths, bit_widths, load_widths
from micronet_jax.train.loop import FitOptions, Schedule, resolve_steps_per_dispatch
from micronet_jax.train.optim import cosine_per_epoch
from micronet_jax.train.steps import StepConfig

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


def schedule_of(config: Any, epochs: int, num_examples: int) -> Schedule:
    """The epochs, batches and evaluation/checkpoint cadence of a stage of `epochs` epochs."""
    t = config.train
    return Schedule(
        epochs=epochs,
        batch_size=t.batch_size,
        num_examples=num_examples,
        drop_last=t.drop_last,
        batch_multiple=config.model.bn_splits,
        eval_every=t.eval_every,
        checkpoint_every=t.checkpoint_every,
    )


def step_config_of(config: Any, epochs: int, steps_per_epoch: int, **overrides: Any) -> StepConfig:
    """The train step's settings (loss, mixup, AutoAugment, the per-epoch cosine rate) for a
    stage of `epochs` epochs; `overrides` replace any field (the exit stages' augmentation,
    the quantize stage's per-step rate)."""
    fields = dict(
        label_smoothing=config.train.label_smoothing,
        mixup_alpha=config.data.mixup_alpha,
        autoaugment=config.data.autoaugment,
        policy=load_policy(config.data.policy),
        lr_fn=cosine_per_epoch(config.train.lr, epochs, steps_per_epoch),
    )
    fields.update(overrides)
    return StepConfig(**fields)


def fit_options_of(config: Any, **fields: Any) -> FitOptions:
    """The options `config.train` sets for `fit` (guards, disk space, kept checkpoints, steps
    per dispatch), plus the stage's own `fields`."""
    t = config.train
    return FitOptions(
        keep_checkpoints=t.keep_checkpoints,
        nan_policy=t.nan_policy,
        nan_check_every=t.nan_check_every,
        inject_nan_step=t.inject_nan_step,
        min_free_mb=t.min_free_mb,
        steps_per_dispatch=resolve_steps_per_dispatch(t.steps_per_dispatch),
        **fields,
    )
