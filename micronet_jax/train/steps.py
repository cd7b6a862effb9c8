"""Pure train and eval steps. The loop jits them; notebooks can call them directly.

Augmentation (AutoAugment, crop, flip, normalise) and mixup run inside the step, on the
device, from a key derived from (seed, step) — no host work per batch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from micronet_jax.data.augment import eval_transform, mixup, train_transform
from micronet_jax.models.microbatch import map_eval_batch
from micronet_jax.train.losses import mixup_loss, soft_smoothing_loss
from micronet_jax.train.state import (
    ExitTrainState,
    TrainState,
    apply_masks,
    full_variables,
    variables_of,
)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of a train step (hashable, so a jitted step can close over it)."""

    label_smoothing: float = 0.3
    mixup_alpha: float = 1.0  # 0 turns mixup off
    autoaugment: bool = True
    policy: Any = None  # None: the CIFAR-100 policy
    loss: str = "mixup_smoothing"  # or "soft_smoothing" (the exit head's)
    lr_fn: Callable[[jax.Array], jax.Array] | None = None


def augment_batch(
    key: jax.Array, images: jax.Array, labels: jax.Array, cfg: StepConfig
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """uint8 images -> (normalised float images, labels_a, labels_b, λ)."""
    aug_key, mix_key = jax.random.split(key)
    x = train_transform(aug_key, images, autoaugment=cfg.autoaugment, policy=cfg.policy)
    if cfg.mixup_alpha > 0:
        return mixup(mix_key, x, labels, cfg.mixup_alpha)
    return x, labels, labels, jnp.ones((), jnp.float32)


def _mixed_accuracy(logits, labels_a, labels_b, lam) -> jax.Array:
    pred = jnp.argmax(logits, -1)
    acc_a = jnp.mean(pred == labels_a)
    acc_b = jnp.mean(pred == labels_b)
    return lam * acc_a + (1.0 - lam) * acc_b


def _update(state, grads, batch_stats, cfg: StepConfig, loss, logits, mix) -> tuple[Any, dict]:
    """SGD update, new BN statistics, re-masking (pruned weights stay zero) and the metrics."""
    labels_a, labels_b, lam = mix
    lr = cfg.lr_fn(state.step) if cfg.lr_fn is not None else jnp.zeros(())
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    state = state.replace(params=apply_masks(state.params, state.masks))
    metrics = {
        "loss": loss,
        "accuracy": _mixed_accuracy(logits, labels_a, labels_b, lam),
        "lr": lr,
    }
    return state, metrics


def train_step(
    state: TrainState, batch: dict[str, jax.Array], key: jax.Array, cfg: StepConfig
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step of the main network: augment, mix, forward/backward, update, re-mask."""
    data_key, dropout_key = jax.random.split(key)
    x, labels_a, labels_b, lam = augment_batch(data_key, batch["image"], batch["label"], cfg)

    def loss_fn(params):
        (logits, _), updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            x,
            train=True,
            rngs={"dropout": dropout_key},
            mutable=["batch_stats"],
        )
        loss = mixup_loss(logits, labels_a, labels_b, lam, cfg.label_smoothing)
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return _update(state, grads, batch_stats, cfg, loss, logits, (labels_a, labels_b, lam))


def exit_train_step(
    state: ExitTrainState, batch: dict[str, jax.Array], key: jax.Array, cfg: StepConfig
) -> tuple[ExitTrainState, dict[str, jax.Array]]:
    """One step of the exit head: the main network is frozen (no gradient, params untouched)
    but runs in training mode, so all its BN layers keep updating their running statistics."""
    data_key, dropout_key = jax.random.split(key)
    x, labels_a, labels_b, lam = augment_batch(data_key, batch["image"], batch["label"], cfg)
    frozen = jax.lax.stop_gradient(state.frozen_params)

    def loss_fn(head_params):
        params = dict(frozen)
        params["exit_head"] = head_params
        (_, exit_logits), updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            x,
            train=True,
            rngs={"dropout": dropout_key},
            mutable=["batch_stats"],
        )
        loss_a = soft_smoothing_loss(exit_logits, labels_a)
        loss_b = soft_smoothing_loss(exit_logits, labels_b)
        return lam * loss_a + (1.0 - lam) * loss_b, (exit_logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return _update(state, grads, batch_stats, cfg, loss, logits, (labels_a, labels_b, lam))


@functools.cache
def step_function(cfg: StepConfig, exit_head: bool = False) -> Callable:
    """The (state, batch, key) step for `cfg`; cached, so equal settings share a compiled step."""
    return functools.partial(exit_train_step if exit_head else train_step, cfg=cfg)


def predict_step(apply_fn: Callable, variables: dict, images: jax.Array):
    """Eval-mode (main logits, exit logits or None) of a uint8 batch."""
    return map_eval_batch(
        lambda batch: apply_fn(variables, eval_transform(batch), train=False), images
    )


# `predict_step` compiled: the program `predict` runs on each fixed-size batch
predict_jit = jax.jit(predict_step, static_argnums=0)


def fixed_size_batches(images: np.ndarray | jax.Array, batch_size: int):
    """Yield (batch, number of real images): consecutive batches of `min(batch_size, n)`,
    the last one zero-padded, so that a jitted function sees one shape only."""
    n = images.shape[0]
    batch_size = min(batch_size, n)
    for start in range(0, n, batch_size):
        chunk = images[start : start + batch_size]
        valid = chunk.shape[0]
        if valid < batch_size:
            chunk = jnp.pad(chunk, [(0, batch_size - valid)] + [(0, 0)] * (chunk.ndim - 1))
        yield chunk, valid


def predict(
    apply_fn: Callable,
    variables: dict,
    images: np.ndarray | jax.Array,
    batch_size: int = 500,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits of every image; the last partial batch is padded, so one shape compiles once."""
    mains, exits = [], []
    for chunk, valid in fixed_size_batches(images, batch_size):
        main, exit_logits = predict_jit(apply_fn, variables, chunk)
        mains.append(main[:valid])
        if exit_logits is not None:
            exits.append(exit_logits[:valid])
    main = np.asarray(jnp.concatenate(mains))
    exit_all = np.asarray(jnp.concatenate(exits)) if exits else None
    return main, exit_all


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1 accuracy and mean (unsmoothed) cross entropy."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    loss = -log_probs[np.arange(len(labels)), labels].mean()
    accuracy = (logits.argmax(-1) == labels).mean()
    return {"loss": float(loss), "accuracy": float(accuracy)}


def as_variables(state_or_variables: TrainState | dict) -> dict:
    """Full-model variables from a main state, an exit-head state, or variables."""
    if isinstance(state_or_variables, ExitTrainState):
        return full_variables(state_or_variables)
    if isinstance(state_or_variables, TrainState):
        return variables_of(state_or_variables)
    return state_or_variables


def evaluate(
    state_or_variables: TrainState | dict,
    apply_fn: Callable,
    images: np.ndarray | jax.Array,
    labels: np.ndarray,
    batch_size: int = 500,
) -> dict[str, float]:
    """Main-network top-1 and loss on a whole test set, no sample dropped."""
    variables = as_variables(state_or_variables)
    logits, _ = predict(apply_fn, variables, images, batch_size)
    return classification_metrics(logits, np.asarray(labels))


__all__ = [
    "StepConfig",
    "augment_batch",
    "classification_metrics",
    "evaluate",
    "predict",
    "predict_step",
    "exit_train_step",
    "train_step",
]
