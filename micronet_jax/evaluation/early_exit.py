"""Early-exit inference: a sample exits when the exit head's max softmax is above a threshold.

Two implementations with identical predictions:
- `exit_predict_exact` computes both heads for every sample and selects (for evaluation);
- `exit_predict_fast` runs the tail only on the samples that did not exit, a fixed-size
  chunk at a time in a loop whose trip count the device computes — the compute saving the
  MicroNet count promises, under jit's static shapes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from micronet_jax.data.augment import eval_transform
from micronet_jax.errors import ConfigError
from micronet_jax.models.efficientnet import MicroNet
from micronet_jax.models.microbatch import (
    default_micro_batch,
    map_micro_batches,
    split_over_cpu_devices,
)
from micronet_jax.train.steps import fixed_size_batches, predict

DEFAULT_THRESHOLD = 0.85  # the recipe's exit threshold: a sample exits when max softmax > it


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


# the top probability from which a prediction counts as confident (the agreement measures)
CONFIDENT = 0.5


def top_probability(logits: np.ndarray) -> np.ndarray:
    """Each sample's max softmax probability, in NumPy (for code outside a jitted program)."""
    shifted = logits - logits.max(-1, keepdims=True)
    return 1.0 / np.exp(shifted).sum(-1)


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


def agreement(result: ExitResult, reference: ExitResult) -> dict[str, float]:
    """Top-1 agreement with a reference run: of the main head, the exit head and the
    combined prediction."""
    return {
        "main": float(np.mean(result.main_predictions == reference.main_predictions)),
        "exit": float(np.mean(result.exit_predictions == reference.exit_predictions)),
        "combined": float(np.mean(result.predictions == reference.predictions)),
    }


def logit_agreement(
    got: tuple[np.ndarray, ...],
    reference: tuple[np.ndarray, ...],
    threshold: float = DEFAULT_THRESHOLD,
) -> dict[str, float]:
    """`agreement` from each head's logits (one head or two), plus `confident` (the main
    head's on the images the reference is sure of), the exit ratio of `got` and the largest
    main-head logit difference."""
    main, main_reference = np.asarray(got[0]), np.asarray(reference[0])
    same = main.argmax(-1) == main_reference.argmax(-1)
    out = {"main": float(np.mean(same))}
    out["confident"] = float(np.mean(same[top_probability(main_reference) >= CONFIDENT]))
    if len(got) > 1:
        result = select_predictions(got[0], got[1], threshold)
        both = agreement(result, select_predictions(reference[0], reference[1], threshold))
        out |= {"exit": both["exit"], "combined": both["combined"]}
        out["exit_ratio"] = result.exit_ratio
    out["max_logit_difference"] = float(np.max(np.abs(main - main_reference)))
    return out


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
    apply_fn: Callable | None = None,
) -> ExitResult:
    """Both heads on every sample, then the threshold rule (`apply_fn`: another way of
    applying the model, e.g. quantised; default `model.apply`)."""
    if model.arch.exit_head is None:
        raise ConfigError("the model has no exit head")
    main, exits = predict(apply_fn or model.apply, variables, images, batch_size)
    return select_predictions(main, exits, threshold)


@functools.partial(jax.jit, static_argnums=(0, 4))
def fast_exit_batch(
    model: MicroNet, variables: dict, images: jax.Array, threshold: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array]:
    """(predictions, exited) of one batch, running the tail only on samples that continue.

    The trunk and exit head run on every sample; the continuing samples are ordered first
    and the tail runs on them `chunk` at a time, in a loop whose trip count is computed on
    the device: one program for any exit ratio, no host round trip, and at most `chunk - 1`
    samples of wasted tail work. With one CPU device per core, each core does all of this
    for its own share of the batch.
    """

    def one_device(images):
        size = min(chunk, images.shape[0])

        def trunk_and_exit(batch):
            features = model.apply(variables, eval_transform(batch), method=MicroNet.trunk)
            return features, model.apply(variables, features, method=MicroNet.exit)

        features, exit_logits = map_micro_batches(trunk_and_exit, images, default_micro_batch())
        exited = exit_confidence(exit_logits) > threshold
        order = jnp.argsort(exited, stable=True)  # continuing samples first

        def tail_on_chunk(i, predictions):
            # the last chunk's start is clamped back into the batch: it may repeat continuing
            # samples (same result) and include exited ones (their prediction is kept)
            index = lax.dynamic_slice_in_dim(order, i * size, size)
            logits = model.apply(variables, features[index], method=MicroNet.tail)
            chosen = jnp.where(exited[index], predictions[index], logits.argmax(-1))
            return predictions.at[index].set(chosen)

        chunks = (jnp.sum(~exited) + size - 1) // size
        predictions = lax.fori_loop(0, chunks, tail_on_chunk, exit_logits.argmax(-1))
        return predictions, exited

    return split_over_cpu_devices(one_device, images)


def tail_chunk_size(batch_size: int) -> int:
    """Samples per tail run: the CPU micro-batch (activations stay in cache), else an eighth
    of the batch (accelerators want wide batches; the waste is then under 1/8 of the tail)."""
    return min(batch_size, default_micro_batch() or max(1, -(-batch_size // 8)))


def exit_predict_fast(
    model: MicroNet,
    variables: dict,
    images: np.ndarray,
    threshold: float,
    batch_size: int = 512,
    chunk: int | None = None,
) -> ExitResult:
    """Run the tail only on samples that did not exit; predictions equal `exit_predict_exact`'s.

    One program per batch (`fast_exit_batch`): trunk and exit head on every sample, then the tail
    on the continuing ones, `chunk` samples at a time (default `tail_chunk_size`).
    """
    if model.arch.exit_head is None:
        raise ConfigError("the model has no exit head")
    threshold = jnp.float32(check_threshold(threshold))
    batch_size = min(batch_size, images.shape[0])
    chunk = min(chunk or tail_chunk_size(batch_size), batch_size)
    outputs = [
        (fast_exit_batch(model, variables, jnp.asarray(batch), threshold, chunk), valid)
        for batch, valid in fixed_size_batches(images, batch_size)
    ]  # all batches dispatched before the first result is read back
    predictions = np.concatenate([np.asarray(pred)[:valid] for (pred, _), valid in outputs])
    exited = np.concatenate([np.asarray(ex)[:valid] for (_, ex), valid in outputs])
    return ExitResult(predictions, exited)
