"""The recipe's losses: label smoothing, its mixup-weighted form, and soft smoothing."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smoothed_targets(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """1 − ε on the true class and ε/(K − 1) on each other class (0.7 and 0.3/99)."""
    off = smoothing / (num_classes - 1)
    one_hot = jax.nn.one_hot(labels, num_classes)
    return one_hot * (1.0 - smoothing) + (1.0 - one_hot) * off


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
    """Per-sample cross entropy against label-smoothed targets."""
    targets = smoothed_targets(labels, logits.shape[-1], smoothing)
    return -jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)


def mixup_loss(
    logits: jax.Array,
    labels_a: jax.Array,
    labels_b: jax.Array,
    lam: jax.Array,
    smoothing: float,
) -> jax.Array:
    """λ·L(y_a) + (1 − λ)·L(y_b), averaged over the batch."""
    loss_a = smoothed_cross_entropy(logits, labels_a, smoothing)
    loss_b = smoothed_cross_entropy(logits, labels_b, smoothing)
    return jnp.mean(lam * loss_a + (1.0 - lam) * loss_b)


def soft_smoothing_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean of CE_i · (1 + max softmax_i); the max is not detached, so it gets a gradient."""
    log_probs = jax.nn.log_softmax(logits)
    ce = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    confidence = jnp.max(jnp.exp(log_probs), axis=-1)
    return jnp.mean(ce * (1.0 + confidence))


def distillation_loss(
    logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0
) -> jax.Array:
    """Cross entropy against the teacher's softened distribution (soft targets, no labels),
    times T² so that its gradient keeps its scale at any temperature; batch mean."""
    targets = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits) / temperature)
    log_probs = jax.nn.log_softmax(logits / temperature)
    return -jnp.mean(jnp.sum(targets * log_probs, axis=-1)) * temperature**2
