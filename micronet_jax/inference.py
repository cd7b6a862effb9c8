"""Early-exit inference: a sample exits when the exit head's max softmax is above a threshold.

Two implementations with identical predictions:
- `exit_predict_exact` computes both heads for every sample and selects (for evaluation);
- `exit_predict_fast` runs the tail only on the samples that did not exit, gathered into a
  bucket of the smallest of a few compiled sizes that holds them and scattered back — the
  compute saving the MicroNet count promises, under jit's static shapes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from micronet_jax.data.augment import eval_transform
from micronet_jax.errors import ConfigError
from micronet_jax.models.efficientnet import MicroNet
from micronet_jax.models.microbatch import default_micro_batch, map_micro_batches
from micronet_jax.train.steps import fixed_size_batches, predict


def check_threshold(threshold: float) -> float:
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"exit threshold must be in (0, 1), got {threshold}")
    return float(threshold)


@dataclasses.dataclass(frozen=True)
class ExitResult:
    """Per-sample predictions and which samples exited early."""

    predictions: np.ndarray
    exited: np.ndarray
    main_predictions: np.ndarray | None = None
    exit_predictions: np.ndarray | None = None

    @property
    def exit_ratio(self) -> float:
        return float(np.mean(self.exited))


def exit_confidence(exit_logits: jax.Array) -> jax.Array:
    """The exit head's confidence in each sample: its max softmax probability."""
    return jax.nn.softmax(exit_logits, axis=-1).max(-1)


def exit_decision(exit_logits: np.ndarray, threshold: float) -> np.ndarray:
    """True where max softmax > threshold (strict)."""
    return np.asarray(exit_confidence(jnp.asarray(exit_logits)) > threshold)


def select_predictions(
    main_logits: np.ndarray, exit_logits: np.ndarray, threshold: float
) -> ExitResult:
    """Combine both heads' logits by the threshold rule."""
    exited = exit_decision(exit_logits, check_threshold(threshold))
    main_pred = np.asarray(main_logits).argmax(-1)
    exit_pred = np.asarray(exit_logits).argmax(-1)
    return ExitResult(np.where(exited, exit_pred, main_pred), exited, main_pred, exit_pred)


def exit_metrics(result: ExitResult, labels: np.ndarray) -> dict[str, float]:
    """Accuracy of each path (over all samples and over its own samples) and overall."""
    labels = np.asarray(labels)
    out = {
        "accuracy": float(np.mean(result.predictions == labels)),
        "exit_ratio": result.exit_ratio,
    }
    if result.main_predictions is not None:
        out["main_accuracy"] = float(np.mean(result.main_predictions == labels))
        out["exit_head_accuracy"] = float(np.mean(result.exit_predictions == labels))
    ex = result.exited
    if ex.any():
        out["accuracy_of_exited"] = float(np.mean(result.predictions[ex] == labels[ex]))
    if (~ex).any():
        out["accuracy_of_continued"] = float(np.mean(result.predictions[~ex] == labels[~ex]))
    return out


def exit_predict_exact(
    model: MicroNet,
    variables: dict,
    images: np.ndarray,
    threshold: float,
    batch_size: int = 500,
) -> ExitResult:
    """Both heads on every sample, then the threshold rule."""
    if model.arch.exit_head is None:
        raise ConfigError("the model has no exit head")
    main, exits = predict(model.apply, variables, images, batch_size)
    return select_predictions(main, exits, threshold)


@functools.partial(jax.jit, static_argnums=0)
def _trunk_and_exit(model: MicroNet, variables: dict, images: jax.Array, threshold: jax.Array):
    """Trunk and exit head on every sample: (features, exit predictions, exited, order, count).

    `order` lists the continuing samples first; `count` is how many continue.
    """

    def trunk_and_exit(batch):
        features = model.apply(variables, eval_transform(batch), method=MicroNet.trunk)
        return features, model.apply(variables, features, method=MicroNet.exit)

    features, exit_logits = map_micro_batches(trunk_and_exit, images, default_micro_batch())
    exited = exit_confidence(exit_logits) > threshold
    order = jnp.argsort(exited, stable=True)
    return features, exit_logits.argmax(-1), exited, order, jnp.sum(~exited)


@functools.partial(jax.jit, static_argnums=(0, 6))
def _tail_on_continuing(
    model: MicroNet,
    variables: dict,
    features: jax.Array,
    exit_predictions: jax.Array,
    exited: jax.Array,
    order: jax.Array,
    capacity: int,
) -> jax.Array:
    """The tail on the first `capacity` samples of `order`, scattered into the predictions."""
    index = order[:capacity]
    logits = map_micro_batches(
        lambda f: model.apply(variables, f, method=MicroNet.tail),
        features[index],
        default_micro_batch(),
    )
    chosen = jnp.where(exited[index], exit_predictions[index], logits.argmax(-1))
    return exit_predictions.at[index].set(chosen)


def bucket_sizes(batch_size: int, buckets: int = 16) -> tuple[int, ...]:
    """Capacities for the tail batch: multiples of batch_size/buckets (rounded up to 16, so
    that CPU micro-batches divide them)."""
    per_bucket = -(-batch_size // buckets)
    step = max(16, -(-per_bucket // 16) * 16)
    sizes = list(range(step, batch_size, step)) + [batch_size]
    return tuple(sorted(set(sizes)))


def exit_predict_fast(
    model: MicroNet,
    variables: dict,
    images: np.ndarray,
    threshold: float,
    batch_size: int = 512,
    buckets: Sequence[int] | None = None,
) -> ExitResult:
    """Run the tail only on samples that did not exit.

    Per batch, one program runs the trunk and exit head and counts the continuing samples;
    a second runs the tail on them, gathered into the smallest bucket that holds them (a few
    compiled sizes) and scattered back. Predictions equal `exit_predict_exact`'s.
    """
    if model.arch.exit_head is None:
        raise ConfigError("the model has no exit head")
    threshold = jnp.float32(check_threshold(threshold))
    batch_size = min(batch_size, images.shape[0])
    sizes = tuple(sorted(buckets)) if buckets else bucket_sizes(batch_size)
    predictions, exited_all = [], []
    for chunk, valid in fixed_size_batches(images, batch_size):
        features, pred, exited, order, continuing = _trunk_and_exit(
            model, variables, jnp.asarray(chunk), threshold
        )
        continuing = int(continuing)
        if continuing:
            capacity = next(s for s in sizes if s >= continuing)
            pred = _tail_on_continuing(model, variables, features, pred, exited, order, capacity)
        predictions.append(np.asarray(pred)[:valid])
        exited_all.append(np.asarray(exited)[:valid])
    return ExitResult(np.concatenate(predictions), np.concatenate(exited_all))
