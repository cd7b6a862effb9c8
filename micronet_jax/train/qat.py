"""Quantisation-aware training: the whole network (main path and exit head) trained with its
weights and activations on their grids (fake quantisation, straight-through gradients).

The step is the recipe's (augmentation, SGD, masks re-applied, BN in training mode), with the
forward pass through `QuantizedApply(..., ste=True)` and the activation ranges calibrated
when the stage starts, held in the state. With `freeze_bn` the BN layers keep the running
statistics they start with (and dropout is off): what fine-tuning on other data than the
network was trained on needs, since there the batch statistics are not the network's. Its
loss is either the recipe's, on both heads
(mixup label smoothing for the main head, soft smoothing for the exit head), or, with a
teacher (the float32 network the stage started from, frozen), distillation: cross entropy
against the teacher's soft predictions on the same augmented batch, for both heads; no labels.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from micronet_jax.quant.fake import QuantizedApply
from micronet_jax.quant.widths import BitWidths
from micronet_jax.train.losses import distillation_loss, mixup_loss, soft_smoothing_loss
from micronet_jax.train.state import TrainState, apply_masks
from micronet_jax.train.steps import StepConfig, augment_batch


class QuantTrainState(TrainState):
    """A TrainState with the activation ranges and, for distillation, the frozen teacher
    (its params and BN statistics; an empty dict when training on labels)."""

    ranges: Any
    teacher: Any


@dataclasses.dataclass(frozen=True)
class QuantStepConfig:
    """Static settings of a quantisation-aware step."""

    base: StepConfig
    bits: BitWidths
    distill: bool = False
    temperature: float = 1.0
    freeze_bn: bool = False  # BN from its running statistics (kept), dropout off


def create_quant_state(
    model: Any,
    variables: dict,
    ranges: dict,
    tx: Any,
    seed: int,
    masks: Any,
    bits: BitWidths,
    distill: bool,
) -> QuantTrainState:
    """A fresh quantisation-aware state around float32 variables (also the teacher's)."""
    params = apply_masks(variables["params"], masks)
    teacher = {"params": params, "batch_stats": variables["batch_stats"]} if distill else {}
    teacher = jax.tree_util.tree_map(jnp.copy, teacher)  # own buffers: the state is donated
    return QuantTrainState.create(
        apply_fn=QuantizedApply(model, bits, ste=True),
        params=params,
        tx=tx,
        batch_stats=variables["batch_stats"],
        masks=masks,
        rng=jax.random.key_data(jax.random.key(seed)),
        ranges=ranges,
        teacher=teacher,
    )


@functools.cache
def quant_step_function(cfg: QuantStepConfig) -> Any:
    """The (state, batch, key) step for `cfg`; cached, so equal settings share a program."""
    return functools.partial(quant_train_step, cfg=cfg)


def quant_train_step(
    state: QuantTrainState, batch: dict[str, jax.Array], key: jax.Array, cfg: QuantStepConfig
) -> tuple[QuantTrainState, dict[str, jax.Array]]:
    """One SGD step of the quantised network (both heads), masks re-applied."""
    data_key, dropout_key = jax.random.split(key)
    x, labels_a, labels_b, lam = augment_batch(data_key, batch["image"], batch["label"], cfg.base)
    if cfg.distill:
        teacher_main, teacher_exit = state.apply_fn.model.apply(state.teacher, x, train=False)

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats, "quant": state.ranges}
        if cfg.freeze_bn:
            logits, exit_logits = state.apply_fn(variables, x, train=False)
            updates = {"batch_stats": state.batch_stats}
        else:
            (logits, exit_logits), updates = state.apply_fn(
                variables, x, train=True, rngs={"dropout": dropout_key}, mutable=["batch_stats"]
            )
        if cfg.distill:
            loss = distillation_loss(logits, teacher_main, cfg.temperature)
            loss += distillation_loss(exit_logits, teacher_exit, cfg.temperature)
        else:
            loss = mixup_loss(logits, labels_a, labels_b, lam, cfg.base.label_smoothing)
            exit_a = soft_smoothing_loss(exit_logits, labels_a)
            loss += lam * exit_a + (1.0 - lam) * soft_smoothing_loss(exit_logits, labels_b)
        return loss, (logits, teacher_main if cfg.distill else None, updates["batch_stats"])

    (loss, (logits, target, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    lr = cfg.base.lr_fn(state.step) if cfg.base.lr_fn is not None else jnp.zeros(())
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    state = state.replace(params=apply_masks(state.params, state.masks))
    prediction = jnp.argmax(logits, -1)
    if cfg.distill:  # agreement with the teacher stands in for accuracy
        accuracy = jnp.mean(prediction == jnp.argmax(target, -1))
    else:
        accuracy = lam * jnp.mean(prediction == labels_a) + (1 - lam) * jnp.mean(
            prediction == labels_b
        )
    return state, {"loss": loss, "accuracy": accuracy, "lr": lr}


def quant_variables(state: QuantTrainState) -> dict:
    """The quantised network's variables (float32 values on their grids once applied with
    `QuantizedApply`), activation ranges included."""
    return {"params": state.params, "batch_stats": state.batch_stats, "quant": state.ranges}
