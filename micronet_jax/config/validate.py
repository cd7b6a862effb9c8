"""Checks of a config before any data is loaded or anything compiles.

A mistake found after minutes of compilation (or hours of training) wastes the run, so
`validate_config` looks at every value it can judge cheaply and raises one ConfigError
naming it. (Whether a workdir may be resumed with a config is `workdir.check_resume`.)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax

from micronet_jax.backend import on_cpu
from micronet_jax.config import builders
from micronet_jax.data.policy import Policy, load_policy
from micronet_jax.errors import ConfigError
from micronet_jax.evaluation.early_exit import check_threshold
from micronet_jax.models.conv import CONV_IMPLS
from micronet_jax.train import pruning
from micronet_jax.train.guard import NAN_POLICIES

MODES = ("train", "pipeline", "test", "quantize")
CALIBRATIONS = ("mse", "max")
SOURCES = ("auto", "archive", "tfds")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{name} must be positive, got {value!r}")


def _at_least(name: str, value: Any, low: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value!r}")


def _fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ConfigError(f"{name} must be in [0, 1), got {value!r}")


def _choice(name: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{name} must be one of {choices}, got {value!r}")


def check_batch_sizes(config: Any, devices: int | None = None) -> None:
    """Ghost BN splits every batch into `bn_splits` equal parts on each device."""
    splits = config.model.bn_splits
    _positive("model.bn_splits", splits)
    devices = jax.device_count() if devices is None else devices
    unit = splits * devices
    for name in ("batch_size", "eval_batch_size"):
        size = config.train[name]
        _positive(f"train.{name}", size)
        if size % unit:
            raise ConfigError(
                f"train.{name}={size} must be a multiple of model.bn_splits ({splits}) x "
                f"devices ({devices}) = {unit}"
            )


def check_policy_file(path: str) -> None:
    """A policy file must read as JSON and every row must name known ops and valid values."""
    if not path:
        return
    Policy.from_rows(load_policy(path))


def _check_train(config: Any) -> None:
    t = config.train
    for name in ("epochs", "lr", "eval_every", "checkpoint_every", "keep_checkpoints"):
        _positive(f"train.{name}", t[name])
    _positive("train.nan_check_every", t.nan_check_every)
    _at_least("train.weight_decay", t.weight_decay, 0)
    _at_least("train.min_free_mb", t.min_free_mb, 0)
    _at_least("train.steps_per_dispatch", t.steps_per_dispatch, 0)
    _fraction("train.momentum", t.momentum)
    _fraction("train.label_smoothing", t.label_smoothing)
    _choice("train.nan_policy", t.nan_policy, NAN_POLICIES)


def _check_model(config: Any, with_exit: bool) -> None:
    m = config.model
    _choice("model.dtype", m.dtype, builders.DTYPES)
    _choice("model.conv_impl", m.conv_impl, CONV_IMPLS)
    _fraction("model.dropout", m.dropout)
    _fraction("model.drop_connect", m.drop_connect)
    for name in ("width", "depth", "resolution", "head_filters"):
        _positive(f"model.{name}", m[name])
    builders.architecture_from_config(config, with_exit=with_exit)


def _check_data(config: Any) -> None:
    d = config.data
    builders.num_classes_of(d.name)
    _choice("data.source", d.source, SOURCES)
    _at_least("data.num_train", d.num_train, 0)
    _at_least("data.num_test", d.num_test, 0)
    _at_least("data.mixup_alpha", d.mixup_alpha, 0)
    check_policy_file(d.policy)


def _check_pipeline(config: Any) -> None:
    p = config.pipeline
    _positive("pipeline.epoch_scale", p.epoch_scale)
    for name in ("baseline_epochs", "prune_epochs", "exit_epochs", "exit_prune_epochs"):
        _positive(f"pipeline.{name}", p[name])
    pruning.validate_targets(p.prune_targets)
    pruning.validate_targets(p.exit_prune_targets)
    check_threshold(p.threshold)


def _check_quant(config: Any) -> None:
    q = config.quant
    builders.bit_widths_of(config)  # widths and overrides
    _positive("quant.epochs", q.epochs)
    _positive("quant.lr", q.lr)
    _positive("quant.temperature", q.temperature)
    _positive("quant.calibration_images", q.calibration_images)
    _choice("quant.calibration", q.calibration, CALIBRATIONS)
    if config.mode == "test" and builders.bit_widths_of(config).quantised:
        from micronet_jax.quant.ptq import parse_method

        parse_method(q.ptq_method)
    if config.mode == "quantize" and not builders.bit_widths_of(config).quantised:
        raise ConfigError(
            "mode=quantize needs quant.weight_bits or quant.activation_bits below 16 "
            "(e.g. --config.quant.weight_bits=8 --config.quant.activation_bits=8)"
        )


def _check_cpu_devices(config: Any) -> None:
    """One CPU device per core speeds eval up but slows training down: refuse splitting
    training batches over them (benchmarks/RESULTS.md, Early exit)."""
    _at_least("cpu_devices", config.cpu_devices, 0)
    splits_training = config.mode != "test" and config.train.data_parallel
    single_host = not config.distributed  # a multi-host CPU job is for testing the pod path
    if config.cpu_devices != 1 and splits_training and single_host and on_cpu():
        raise ConfigError(
            "cpu_devices would split training batches over the CPU cores, which trains slower "
            "than one device (0.58x its speed on 2 cores); add "
            "--config.train.data_parallel=False to train on one device and evaluate on every core"
        )


def validate_config(config: Any, workdir: str | None = None) -> None:
    """Raise ConfigError on the first value that cannot work; touches no file."""
    _choice("config.mode", config.mode, MODES)
    if config.mode in ("train", "pipeline", "quantize") and not workdir:
        raise ConfigError("--workdir is required for training")
    _check_data(config)
    _check_model(config, with_exit=config.mode != "train")
    _check_train(config)
    _check_quant(config)
    _check_cpu_devices(config)
    check_batch_sizes(config)
    if config.mode != "train":
        _check_pipeline(config)
