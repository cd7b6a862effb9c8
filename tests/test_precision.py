"""bfloat16 compute: close to float32, with float32 params, BN statistics and gradients."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from micronet_jax.models.architecture import build_architecture
from micronet_jax.models.efficientnet import MicroNet, init_variables
from micronet_jax.train.losses import mixup_loss
from micronet_jax.train.optim import make_optimizer
from micronet_jax.train.state import create_train_state
from micronet_jax.train.steps import StepConfig, train_step

TINY = (
    "r1_k3_s1_e1_i8_o8_se0.25",
    "r1_k3_s2_e2_i8_o16_se0.25",
    "r1_k3_s1_e2_i16_o16_se0.25",
)


def tiny_arch():
    return build_architecture(TINY, width=1.0, resolution=1.0, head_filters=32, num_classes=10)


@functools.cache
def compiled_loss_and_grads(dtype):
    """Loss and gradients under jit, compiled once per dtype (op by op, bf16 on a CPU is slow)."""
    model = MicroNet(arch=tiny_arch(), dtype=dtype)

    def loss_fn(params, batch_stats, x, labels):
        (logits, _), updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            rngs={"dropout": jax.random.key(1)},
            mutable=["batch_stats"],
        )
        return mixup_loss(logits, labels, labels[::-1], 0.7, 0.3), (logits, updates)

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


def loss_and_grads(dtype, variables, x, labels):
    return compiled_loss_and_grads(dtype)(variables["params"], variables["batch_stats"], x, labels)


@pytest.fixture(scope="module")
def setup():
    variables = init_variables(MicroNet(arch=tiny_arch()), jax.random.key(0))
    x = jax.random.normal(jax.random.key(2), (32, 32, 32, 3))
    labels = jax.random.randint(jax.random.key(3), (32,), 0, 10)
    return variables, x, labels


@pytest.mark.slow
def test_bf16_loss_close_to_fp32(setup):
    (l32, _), _ = loss_and_grads(jnp.float32, *setup)
    (l16, (logits, _)), _ = loss_and_grads(jnp.bfloat16, *setup)
    assert logits.dtype == jnp.float32  # the classifier's output is cast back
    assert float(l16) == pytest.approx(float(l32), rel=0.02)
    assert float(l16) != float(l32)  # bf16 really ran


@pytest.mark.slow
def test_bf16_grads_are_fp32_finite_and_close(setup):
    _, g32 = loss_and_grads(jnp.float32, *setup)
    _, g16 = loss_and_grads(jnp.bfloat16, *setup)
    leaves16, leaves32 = jax.tree_util.tree_leaves(g16), jax.tree_util.tree_leaves(g32)
    assert all(g.dtype == jnp.float32 for g in leaves16)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves16)
    flat16 = np.concatenate([np.ravel(g) for g in leaves16])
    flat32 = np.concatenate([np.ravel(g) for g in leaves32])
    cosine = flat16 @ flat32 / (np.linalg.norm(flat16) * np.linalg.norm(flat32))
    assert cosine > 0.95


@pytest.mark.slow
def test_bf16_train_step_keeps_fp32_state():
    model = MicroNet(arch=tiny_arch(), dtype=jnp.bfloat16)
    variables = init_variables(model, jax.random.key(0))
    state = create_train_state(model.apply, variables, make_optimizer(0.13, 2, 1), seed=0)
    before = jax.tree_util.tree_leaves(state.batch_stats)
    batch = {
        "image": jax.random.randint(jax.random.key(4), (32, 32, 32, 3), 0, 256).astype(jnp.uint8),
        "label": jax.random.randint(jax.random.key(5), (32,), 0, 10),
    }
    step = jax.jit(functools.partial(train_step, cfg=StepConfig(autoaugment=False)))
    new, metrics = step(state, batch, jax.random.key(6))
    assert np.isfinite(float(metrics["loss"]))
    for tree in (new.params, new.batch_stats, new.opt_state):
        for leaf in jax.tree_util.tree_leaves(tree):
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                assert leaf.dtype == jnp.float32
                assert bool(jnp.all(jnp.isfinite(leaf)))
    after = jax.tree_util.tree_leaves(new.batch_stats)
    assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True))
