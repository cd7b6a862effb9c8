"""micronet_jax: the OSI AI MicroNet Challenge entry (CIFAR-100) in JAX/Flax.

The public API, one import away (`from micronet_jax import MicroNet, count_micronet`).
Names load on first use, so `import micronet_jax` stays cheap and touches no JAX backend
(call `use_cpu_cores` before anything else runs). Each name's home module is in `API`;
docs/architecture.md maps the subpackages.
"""

from __future__ import annotations

import importlib
from typing import Any

from micronet_jax.errors import CheckpointError as CheckpointError
from micronet_jax.errors import ConfigError as ConfigError
from micronet_jax.errors import DataError as DataError
from micronet_jax.errors import LaunchError as LaunchError
from micronet_jax.errors import MicronetError as MicronetError

__version__ = "0.1.0"

# name -> the module that defines it
API: dict[str, str] = {
    # the model: one Architecture (block args after compound scaling) for model and counter
    "Architecture": "models.architecture",
    "build_architecture": "models.architecture",
    "MicroNet": "models.efficientnet",
    "create_model": "models.efficientnet",
    "init_variables": "models.efficientnet",
    # data
    "load_train_test": "data.cifar",
    "train_transform": "data.augment",
    "eval_transform": "data.augment",
    "CIFAR100_MEAN": "data.augment",
    "CIFAR100_STD": "data.augment",
    # training: state, pure steps, the optimizer, the epoch loop
    "TrainState": "train.state",
    "create_train_state": "train.state",
    "create_exit_state": "train.state",
    "apply_masks": "train.state",
    "StepConfig": "train.steps",
    "train_step": "train.steps",
    "exit_train_step": "train.steps",
    "predict": "train.steps",
    "evaluate": "train.steps",
    "make_optimizer": "train.optim",
    "DeviceData": "train.loop",
    "Schedule": "train.loop",
    "FitOptions": "train.loop",
    "fit": "train.loop",
    "run_epoch": "train.loop",
    # pruning: layer-normalised global magnitude masks
    "prune_masks": "train.pruning",
    "global_sparsity": "train.pruning",
    "sparsity_by_layer": "train.pruning",
    # the MicroNet counter
    "count_micronet": "scoring.counter",
    "measured_sparsity": "scoring.counter",
    "MicroNetCount": "scoring.counter",
    "format_table": "scoring.table",
    "BitWidths": "quant.widths",
    "bit_widths": "quant.widths",
    # the original's .pth checkpoints, without torch
    "load_original": "models.torch_import",
    # early exit
    "select_predictions": "evaluation.early_exit",
    "exit_predict_exact": "evaluation.early_exit",
    "exit_predict_fast": "evaluation.early_exit",
    "exit_metrics": "evaluation.early_exit",
    # quantisation: fake quantisation, calibration, post-training quantisation, BN folding
    "QuantizedApply": "quant.fake",
    "quantize_weights": "quant.fake",
    "calibrate": "quant.fake",
    "post_training_quantize": "quant.ptq",
    "fold_batch_norm": "models.fold",
    # the recipe
    "default_config": "config.defaults",
    "train_and_evaluate": "recipe.pipeline",
    "run_pipeline": "recipe.pipeline",
    "run_test": "recipe.pipeline",
    "load_final": "recipe.stages",
    "write_plots": "recipe.run_plots",
    # the backend
    "use_cpu_cores": "backend",
    "enable_compilation_cache": "backend",
    "lowering_for": "backend",
}

__all__ = sorted(
    [*API, "CheckpointError", "ConfigError", "DataError", "LaunchError", "MicronetError"]
)


def __getattr__(name: str) -> Any:
    module = API.get(name)
    if module is None:
        raise AttributeError(f"module 'micronet_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"micronet_jax.{module}"), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(API))
