"""Early-exit inference: a sample exits when the exit head's max softmax is above a threshold.

Two implementations with identical predictions:
- `exit_predict_exact` computes both heads for every sample and selects (for evaluation);
- `exit_predict_fast` runs the tail only on the samples that did not exit, gathered into a
  fixed-capacity bucket (a few compiled sizes) and scattered back — the compute saving the
  MicroNet count promises, under jit's static shapes.
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


def exit_decision(exit_logits: np.ndarray, threshold: float) -> np.ndarray:
    """True where max softmax > threshold (strict)."""
    return np.asarray(jax.nn.softmax(jnp.asarray(exit_logits), axis=-1).max(-1) > threshold)


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
    from micronet_jax.train.steps import predict

    if model.arch.exit_head is None:
        raise ConfigError("the model has no exit head")
    main, exits = predict(model.apply, variables, images, batch_size)
    return select_predictions(main, exits, threshold)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _exit_then_tail(
    model: MicroNet, variables: dict, images: jax.Array, threshold: jax.Array, capacity: int
):
    """One program: trunk, exit head, then the tail on `capacity` samples, continuing ones first.

    Returns (predictions, exited, number continuing). Predictions are right for every sample
    when the number continuing is at most `capacity`.
    """
    micro = default_micro_batch()

    def trunk_and_exit(batch):
        features = model.apply(variables, eval_transform(batch), method=MicroNet.trunk)
        return features, model.apply(variables, features, method=MicroNet.exit)

    def tail(features):
        return model.apply(variables, features, method=MicroNet.tail)

    features, exit_logits = map_micro_batches(trunk_and_exit, images, micro)
    exited = jax.nn.softmax(exit_logits, axis=-1).max(-1) > threshold
    index = jnp.argsort(exited, stable=True)[:capacity]  # continuing samples first
    tail_logits = map_micro_batches(tail, features[index], micro)
    predictions = exit_logits.argmax(-1)
    chosen = jnp.where(exited[index], predictions[index], tail_logits.argmax(-1))
    return predictions.at[index].set(chosen), exited, jnp.sum(~exited)


def bucket_sizes(batch_size: int, buckets: int = 16) -> tuple[int, ...]:
    """Capacities for the tail batch: multiples of batch_size/buckets (rounded up to 16, so
    that CPU micro-batches divide them)."""
    step = max(16, -(-batch_size // buckets + 15) // 16 * 16)
    sizes = list(range(step, batch_size, step)) + [batch_size]
    return tuple(sorted(set(sizes)))


def _capacity_for(expected: float, sizes: Sequence[int]) -> int:
    """The smallest bucket above `expected` plus one binomial standard deviation."""
    need = expected + np.sqrt(max(expected, 1.0))
    return next((s for s in sizes if s >= need), sizes[-1])


def exit_predict_fast(
    model: MicroNet,
    variables: dict,
    images: np.ndarray,
    threshold: float,
    batch_size: int = 512,
    buckets: Sequence[int] | None = None,
) -> ExitResult:
    """Run the tail only on samples that did not exit, in one program per batch.

    The tail's capacity is a bucket sized from the previous batch's count of continuing
    samples (a few compiled sizes; the whole batch for the first, as rerunning a batch costs
    more than a roomy tail); a batch that overflows it is run again with enough room,
    so predictions always equal `exit_predict_exact`'s.
    """
    if model.arch.exit_head is None:
        raise ConfigError("the model has no exit head")
    threshold = jnp.float32(check_threshold(threshold))
    n = images.shape[0]
    batch_size = min(batch_size, n)
    sizes = tuple(sorted(buckets)) if buckets else bucket_sizes(batch_size)
    capacity = sizes[-1]  # the first batch has no count to go by: room for every sample
    predictions, exited_all = [], []
    for start in range(0, n, batch_size):
        chunk = np.asarray(images[start : start + batch_size])
        valid = chunk.shape[0]
        if valid < batch_size:
            pad = np.zeros((batch_size - valid, *chunk.shape[1:]), chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        chunk = jnp.asarray(chunk)
        pred, exited, continuing = _exit_then_tail(model, variables, chunk, threshold, capacity)
        continuing = int(continuing)
        if continuing > capacity:
            capacity = next(s for s in sizes if s >= continuing)
            pred, exited, _ = _exit_then_tail(model, variables, chunk, threshold, capacity)
        predictions.append(np.asarray(pred)[:valid])
        exited_all.append(np.asarray(exited)[:valid])
        capacity = _capacity_for(continuing, sizes)
    return ExitResult(np.concatenate(predictions), np.concatenate(exited_all))
