"""The training state: params, BN statistics, optimizer state, pruning masks and RNG."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
    """flax's TrainState plus what the recipe and an exact resume need.

    `masks` is params-shaped (ones where nothing is pruned); `rng` is the raw key every step's
    randomness is folded out of, so (rng, step) alone reproduces any batch.
    """

    batch_stats: Any
    masks: Any
    rng: jax.Array


def ones_masks(params: Any) -> Any:
    """Dense masks: all ones, params-shaped."""
    return jax.tree_util.tree_map(jnp.ones_like, params)


def apply_masks(params: Any, masks: Any) -> Any:
    return jax.tree_util.tree_map(lambda p, m: p * m.astype(p.dtype), params, masks)


def create_train_state(
    apply_fn: Any,
    variables: dict,
    tx: optax.GradientTransformation,
    seed: int,
    masks: Any = None,
) -> TrainState:
    """A fresh state (step 0, fresh optimizer) around existing variables."""
    params = variables["params"]
    masks = ones_masks(params) if masks is None else masks
    return TrainState.create(
        apply_fn=apply_fn,
        params=apply_masks(params, masks),
        tx=tx,
        batch_stats=variables.get("batch_stats", {}),
        masks=masks,
        rng=jax.random.key_data(jax.random.key(seed)),
    )


STEP_STREAM = 0
SHUFFLE_STREAM = 1


def stream_key(rng: jax.Array, stream: int, index: jax.Array | int) -> jax.Array:
    """Key number `index` of a stream (STEP_STREAM by step, SHUFFLE_STREAM by epoch)."""
    root = jax.random.wrap_key_data(rng)
    return jax.random.fold_in(jax.random.fold_in(root, stream), index)


def variables_of(state: TrainState) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}


class ExitTrainState(TrainState):
    """The exit head's own state; the frozen main network's params ride along untouched.

    `params`, `opt_state`, `masks` and `step` are the head's; `batch_stats` covers the whole
    model, since the frozen network's BN keeps updating its statistics in training mode.
    """

    frozen_params: Any


def create_exit_state(
    apply_fn: Any,
    variables: dict,
    tx: optax.GradientTransformation,
    seed: int,
    head_masks: Any = None,
) -> ExitTrainState:
    """Split full-model variables into the trainable head and the frozen rest."""
    params = dict(variables["params"])
    head = params.pop("exit_head")
    head_masks = ones_masks(head) if head_masks is None else head_masks
    return ExitTrainState.create(
        apply_fn=apply_fn,
        params=apply_masks(head, head_masks),
        tx=tx,
        batch_stats=variables["batch_stats"],
        masks=head_masks,
        rng=jax.random.key_data(jax.random.key(seed)),
        frozen_params=params,
    )


def full_variables(state: ExitTrainState) -> dict:
    """The whole model's variables from an exit-head state."""
    params = dict(state.frozen_params)
    params["exit_head"] = state.params
    return {"params": params, "batch_stats": state.batch_stats}
