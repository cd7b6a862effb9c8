"""Learning a quantised network against its own float32 network (distillation without
labels): the pieces both learners share, and the learner of the fake quantisation the score
counts (`QuantizedApply`, any widths, a width file's included).

Post-training methods move one layer or block at a time; here every kernel, bias and
activation range of the quantised network learns at once, through straight-through
rounding, to give the float32 network's soft predictions on both heads (KL divergence) on
unlabelled images. The teacher is frozen, pruned weights stay zero, and the result is the
same variables as post-training quantisation gives (kernels on their grids, the ranges in
`quant`), so the counter, the export and test mode read it unchanged. The integer network
the runtimes run has its own learner (`deploy.integer_learn`), on these pieces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from micronet_jax.data.augment import normalize_affine
from micronet_jax.quant.fake import QuantizedApply
from micronet_jax.quant.widths import BitWidths


def teacher_fn(model: Any, variables: dict) -> Callable[[Any], tuple]:
    """The float32 network as a function of uint8 NHWC images: (logits, exit logits when it
    has an exit head), on the CPU's fast convolutions."""

    def forward(images):
        outputs = model.apply(variables, normalize_affine(images), train=False)
        if isinstance(outputs, tuple):
            return tuple(o for o in outputs if o is not None)
        return (outputs,)

    return forward


def kl_to_teacher(student: tuple, teacher: tuple) -> jax.Array:
    """Σ over heads of the mean KL(teacher ‖ student) of the softmax predictions."""
    total = 0.0
    for s, t in zip(student, teacher, strict=True):
        p = jax.nn.softmax(t, -1)
        total = total + jnp.mean(
            jnp.sum(p * (jax.nn.log_softmax(t, -1) - jax.nn.log_softmax(s, -1)), -1)
        )
    return total


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random horizontal flips and shifts of up to 4 pixels (edges repeated): uint8 NHWC."""
    flip = rng.random(len(images)) < 0.5
    images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="edge")
    out = np.empty_like(images)
    dy, dx = rng.integers(0, 9, len(images)), rng.integers(0, 9, len(images))
    for i in range(len(images)):
        out[i] = padded[i, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32]
    return out


def batches(images: np.ndarray, steps: int, size: int, augmented: bool, seed: int):
    """`steps` random batches of `images` (without replacement within a batch)."""
    rng = np.random.default_rng(seed)
    size = min(size, len(images))
    for _ in range(steps):
        batch = images[rng.choice(len(images), size, replace=False)]
        yield augment(batch, rng) if augmented else batch


def run_steps(step: Callable, state: Any, stream, steps: int, progress=None):
    """Drive `step(state, batch) -> (state, loss)` over `stream`: (state, losses)."""
    losses: list[float] = []
    bar = progress(steps) if progress is not None else None
    for batch in stream:
        state, loss = step(state, batch)
        losses.append(float(loss))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    if bar is not None:
        bar.close()
    return state, losses


@dataclasses.dataclass(frozen=True)
class FakeQuantLearning:
    """How the fake quantisation learns (`export --learn_steps` at widths other than 8x8)."""

    steps: int = 400
    batch_size: int = 32
    lr: float = 0.001  # per step, relative to each tensor's mean magnitude (Adam), cosine
    augment: bool = True
    held_out: float = 0.1  # share of the images kept out of learning, to judge it on
    seed: int = 0


def learn_fake_quant(
    model: Any,
    bits: BitWidths,
    quantized: dict,
    teacher: Callable[[Any], tuple],
    images: np.ndarray,
    options: FakeQuantLearning = FakeQuantLearning(),
    progress: Callable[[int], Any] | None = None,
) -> tuple[dict, list[float]]:
    """Post-training quantised variables (`quant.ptq`) learned on `images` to give the
    `teacher`'s outputs: kernels and biases (the pruned ones kept at 0), activation ranges
    and kernel channel scales; returned as the same variables, kernels on their grids. The
    result is kept only where it is nearer the teacher (KL) than the start on the images
    held out of learning (`options.held_out`): learning from a good post-training solution
    (AdaRound's 4-bit rounding) can also lose to it. The losses per step, and whether the
    learned variables were kept, ride in the returned losses' attribute `kept`."""
    from micronet_jax.quant.fake import quantize_weights

    held = max(1, int(len(images) * options.held_out)) if options.held_out > 0 else 0
    images, held_out = (images[:-held], images[-held:]) if held else (images, images[:0])

    apply = QuantizedApply(model, bits, ste=True)
    trainable = {
        "params": quantized["params"],
        "quant": quantized["quant"],
        "weight_scales": quantized["weight_scales"],
    }
    masks = jax.tree_util.tree_map(lambda v: (jnp.asarray(v) != 0).astype(jnp.float32), trainable)
    sizes = jax.tree_util.tree_map(lambda v: jnp.mean(jnp.abs(v)) + 1e-8, trainable)
    schedule = optax.cosine_decay_schedule(options.lr, max(options.steps, 1))
    tx = optax.chain(
        optax.scale_by_adam(),
        optax.scale_by_schedule(lambda step: -schedule(step)),
    )
    state = (trainable, tx.init(trainable))

    def loss_fn(t, batch, target):
        variables = {**t, "batch_stats": quantized["batch_stats"]}
        return kl_to_teacher(apply(variables, normalize_affine(batch), train=False), target)

    @jax.jit
    def step(state, batch):
        t, opt = state
        target = jax.lax.stop_gradient(teacher(batch))
        loss, grads = jax.value_and_grad(loss_fn)(t, batch, target)
        updates, opt = tx.update(grads, opt, t)
        updates = jax.tree_util.tree_map(lambda u, s, m: u * s * m, updates, sizes, masks)
        return (optax.apply_updates(t, updates), opt), loss

    stream = batches(images, options.steps, options.batch_size, options.augment, options.seed)
    (learned, _), losses = run_steps(step, state, stream, options.steps, progress)
    params = quantize_weights(learned["params"], bits, False, learned["weight_scales"])
    result = dict(quantized, params=params, quant=learned["quant"])
    result["weight_scales"] = learned["weight_scales"]
    history = Losses(losses)
    if len(held_out):
        kl = held_out_kl(apply, teacher)
        history.held_out = (kl(quantized, held_out), kl(result, held_out))
        history.kept = history.held_out[1] < history.held_out[0]
    return (result if history.kept else quantized), history


class Losses(list):
    """The loss per step; `held_out`: (KL before, KL after) on the held-out images; `kept`:
    whether the learned variables were returned."""

    held_out: tuple[float, float] | None = None
    kept: bool = True


def held_out_kl(apply, teacher, batch: int = 250):
    """A function (variables, uint8 images) -> mean KL from the teacher of `apply`'s
    predictions, jitted once."""
    run = jax.jit(
        lambda v, x: kl_to_teacher(
            tuple(o for o in apply(v, normalize_affine(x), train=False) if o is not None),
            teacher(x),
        )
    )

    def mean_kl(variables: dict, images: np.ndarray) -> float:
        total = 0.0
        for start in range(0, len(images), batch):
            part = images[start : start + batch]
            total += float(run(variables, part)) * len(part)
        return total / len(images)

    return mean_kl
