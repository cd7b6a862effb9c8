"""The CPU-fast lowerings compute the same function and gradients as XLA's native forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from micronet_jax.models import conv, layers
from micronet_jax.models.architecture import build_architecture
from micronet_jax.models.efficientnet import MicroNet, init_variables

TOL = 1e-5


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def value_and_grads(impl, x, kernel, stride, padding, groups):
    w = jax.random.normal(
        jax.random.key(9), conv.conv2d(x, kernel, stride, padding, groups, "xla").shape
    )

    def f(x, k):
        return jnp.sum(jnp.sin(conv.conv2d(x, k, stride, padding, groups, impl)) * w)

    return jax.value_and_grad(f, argnums=(0, 1))(x, kernel)


CASES = {
    "pointwise": ((8, 9, 9, 16), (1, 1, 16, 24), 1, (0, 0), 1),
    "pointwise_narrowing": ((8, 9, 9, 24), (1, 1, 24, 16), 1, (0, 0), 1),
    "depthwise_s1": ((8, 9, 9, 16), (3, 3, 1, 16), 1, (1, 1), 16),
    "depthwise_s2": ((8, 9, 9, 16), (3, 3, 1, 16), 2, (0, 1), 16),
    "depthwise_k5": ((4, 11, 11, 8), (5, 5, 1, 8), 2, (1, 2), 8),
    "depthwise_s1_k5_uneven": ((4, 11, 13, 8), (5, 5, 1, 8), 1, (1, 3), 8),
    "stem_im2col": ((8, 15, 15, 3), (3, 3, 3, 16), 2, (0, 1), 1),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_conv_kinds_agree(name):
    xs, ks, stride, padding, groups = CASES[name]
    x = jax.random.normal(jax.random.key(0), xs)
    k = jax.random.normal(jax.random.key(1), ks)
    fast = conv.conv2d(x, k, stride, padding, groups, "fast")
    ref = conv.conv2d(x, k, stride, padding, groups, "xla")
    assert fast.shape == ref.shape
    assert rel_err(fast, ref) < TOL
    (vf, gf), (vr, gr) = (
        value_and_grads(i, x, k, stride, padding, groups) for i in ("fast", "xla")
    )
    assert rel_err(vf, vr) < TOL
    for a, b in zip(gf, gr, strict=True):
        assert rel_err(a, b) < TOL


@pytest.mark.slow
@pytest.mark.parametrize("kernel,padding", [(3, (1, 1)), (3, (0, 1)), (5, (2, 1))])
def test_inference_depthwise_is_the_training_one_bit_for_bit(kernel, padding):
    # eval mode reads every stride-1 tap from the padded, row-flattened input; the training
    # forward reads shifted 2-D windows; same products, same summation order
    x = jax.random.normal(jax.random.key(0), (3, 9, 12, 8))
    k = jax.random.normal(jax.random.key(1), (kernel, kernel, 1, 8))
    flat = jax.jit(conv.depthwise_sum_flat, static_argnums=(2, 3))(x, k, 1, padding)
    windows = jax.jit(conv.depthwise_sum, static_argnums=(2, 3))(x, k, 1, padding)
    assert flat.shape == windows.shape
    np.testing.assert_array_equal(np.asarray(flat), np.asarray(windows))


@pytest.mark.slow
@pytest.mark.parametrize("stride,padding", [(1, (1, 1)), (2, (0, 1))])
def test_depthwise_kernel_gradient_over_several_chunks(stride, padding):
    """The chunked scan's kernel gradient sums every chunk (here 6 chunks of 2 samples)."""
    x = jax.random.normal(jax.random.key(0), (12, 9, 9, 8))
    k = jax.random.normal(jax.random.key(1), (3, 3, 1, 8))
    out, pullback = jax.vjp(lambda k: conv.conv_xla(x, k, stride, padding, 8), k)
    dy = jax.random.normal(jax.random.key(2), out.shape)
    (expected,) = pullback(dy)
    got = conv.depthwise_kernel_grad(x, dy, 3, stride, padding, chunk_bytes=2 * 9 * 9 * 8 * 4)
    assert rel_err(got, expected) < TOL


def _model_loss(impl, arch, x):
    """Loss and gradients, compiled as training runs them (op by op, the full model's
    shifted-slice lowering takes minutes)."""
    model = MicroNet(arch=arch, conv_impl=impl)
    variables = init_variables(model, jax.random.key(0))

    def loss(params):
        (logits, _), _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            rngs={"dropout": jax.random.key(3)},
            mutable=["batch_stats"],
        )
        return jnp.mean(jax.nn.log_softmax(logits)[:, 0])

    return jax.jit(jax.value_and_grad(loss))(variables["params"])


@pytest.mark.slow
@pytest.mark.parametrize("size", ["tiny"])  # "full": the original's network, 3 minutes
def test_full_model_forward_and_gradient_agree(size):
    if size == "tiny":
        strings = (
            "r1_k3_s1_e1_i8_o8_se0.25",
            "r1_k3_s2_e2_i8_o16_se0.25",
            "r1_k5_s1_e2_i16_o16_se0.25",
        )
        arch = build_architecture(
            strings, width=1.0, resolution=1.0, head_filters=32, num_classes=10
        )
        batch = 8
    else:
        arch, batch = build_architecture(), 4
    x = jax.random.normal(jax.random.key(2), (batch, 32, 32, 3))
    (lf, gf), (lr, gr) = _model_loss("fast", arch, x), _model_loss("xla", arch, x)
    assert rel_err(lf, lr) < TOL
    flat_f, flat_r = jax.tree_util.tree_leaves(gf), jax.tree_util.tree_leaves(gr)
    assert len(flat_f) == len(flat_r) > 10
    scale = max(float(np.max(np.abs(g))) for g in flat_r)
    # 21 blocks of float32 sums in another order: 1e-5 per layer compounds to ~1e-5..3e-5
    tol = 5e-5 if size == "full" else TOL
    for a, b in zip(flat_f, flat_r, strict=True):
        if np.max(np.abs(b)) < 1e-6 * scale:
            # e.g. the bias of a BN feeding a conv + BN: its true gradient is exactly zero
            assert np.max(np.abs(a)) < 1e-6 * scale
        else:
            assert rel_err(a, b) < tol


def _reference_bn(g, scale, bias):
    mean = g.mean((0, 2, 3), keepdims=True)
    var = jnp.square(g - mean).mean((0, 2, 3), keepdims=True)
    return (g - mean) / jnp.sqrt(var + 1e-5) * scale + bias


@pytest.mark.slow
def test_ghost_normalize_gradient_matches_autodiff():
    g = jax.random.normal(jax.random.key(0), (3, 4, 5, 5, 6)) * 3 + 1
    scale, bias = jnp.linspace(0.5, 2, 6), jnp.linspace(-1, 1, 6)
    w = jax.random.normal(jax.random.key(1), g.shape)

    def loss(fn):
        return lambda *a: jnp.sum(jnp.sin(fn(*a)) * w)

    ours = lambda g, s, b: layers.ghost_normalize(g, s, b, 1e-5)[0]  # noqa: E731
    assert rel_err(ours(g, scale, bias), _reference_bn(g, scale, bias)) < TOL
    got = jax.grad(loss(ours), (0, 1, 2))(g, scale, bias)
    want = jax.grad(loss(_reference_bn), (0, 1, 2))(g, scale, bias)
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) < TOL


def test_swish_gradient_matches_autodiff():
    x = jnp.linspace(-8, 8, 101)
    want = jax.grad(lambda x: jnp.sum(jnp.cos(x * jax.nn.sigmoid(x))))(x)
    got = jax.grad(lambda x: jnp.sum(jnp.cos(layers.swish(x))))(x)
    assert rel_err(got, want) < TOL
