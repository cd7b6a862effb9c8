"""The recipe's losses against hand computations in numpy and PyTorch autograd."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from micronet_jax.train.losses import (
    mixup_loss,
    smoothed_cross_entropy,
    smoothed_targets,
    soft_smoothing_loss,
)

RNG = np.random.default_rng(0)
LOGITS = (RNG.standard_normal((6, 100)) * 3).astype(np.float32)
LABELS = np.array([0, 5, 99, 42, 5, 17])
LABELS_B = np.array([3, 5, 1, 42, 98, 0])
# A small problem whose softmax is peaked, so the max-softmax term matters.
SMALL_LOGITS = (RNG.standard_normal((4, 5)) * 2).astype(np.float64)
SMALL_LABELS = np.array([0, 3, 4, 1])


def log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def smoothed_ce_numpy(logits, labels, eps=0.3):
    k = logits.shape[-1]
    t = np.full(logits.shape, eps / (k - 1))
    t[np.arange(len(labels)), labels] = 1 - eps
    return -(t * log_softmax(logits)).sum(-1)


def soft_loss_numpy(z, labels):
    lp = log_softmax(z)
    ce = -lp[np.arange(len(labels)), labels]
    return float(np.mean(ce * (1 + np.exp(lp).max(-1))))


def soft_grad_numpy(z, labels):
    """d/dz of mean CE·(1 + p_k), k = argmax: (p − e_y)(1 + p_k) + CE·p_k(e_k − p), over N."""
    n, c = z.shape
    p = np.exp(log_softmax(z))
    rows = np.arange(n)
    k = p.argmax(-1)
    pk = p[rows, k]
    ce = -np.log(p[rows, labels])
    e_y, e_k = np.eye(c)[labels], np.eye(c)[k]
    return ((p - e_y) * (1 + pk)[:, None] + (ce * pk)[:, None] * (e_k - p)) / n


def test_smoothed_targets():
    """0.7 on the true class, 0.3/99 elsewhere, rows summing to 1."""
    t = np.asarray(smoothed_targets(jnp.asarray(LABELS), 100, 0.3))
    assert t.shape == (6, 100)
    for i, y in enumerate(LABELS):
        assert t[i, y] == pytest.approx(0.7)
        others = np.delete(t[i], y)
        np.testing.assert_allclose(others, 0.3 / 99, rtol=1e-6)
    np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)


def test_smoothed_cross_entropy_matches_numpy():
    """Per-sample −Σ t·log_softmax(z)."""
    ce = smoothed_cross_entropy(jnp.asarray(LOGITS), jnp.asarray(LABELS), 0.3)
    assert ce.shape == (6,)
    np.testing.assert_allclose(np.asarray(ce), smoothed_ce_numpy(LOGITS, LABELS), rtol=1e-5)
    # Smoothing 0 is plain cross entropy.
    plain = smoothed_cross_entropy(jnp.asarray(LOGITS), jnp.asarray(LABELS), 0.0)
    expected = -log_softmax(LOGITS)[np.arange(6), LABELS]
    np.testing.assert_allclose(np.asarray(plain), expected, rtol=1e-5)


def test_smoothed_cross_entropy_large_logits_are_stable():
    """Log-softmax form: huge logits stay finite."""
    z = np.zeros((2, 100), np.float32)
    z[:, 0] = 1e4
    ce = np.asarray(smoothed_cross_entropy(jnp.asarray(z), jnp.asarray([0, 1]), 0.3))
    assert np.all(np.isfinite(ce))
    np.testing.assert_allclose(ce, smoothed_ce_numpy(z, np.array([0, 1])), rtol=1e-5)


@pytest.mark.parametrize("lam", [0.0, 0.37, 1.0])
def test_mixup_loss(lam):
    """λ·L(y_a) + (1 − λ)·L(y_b), batch mean."""
    got = mixup_loss(
        jnp.asarray(LOGITS), jnp.asarray(LABELS), jnp.asarray(LABELS_B), jnp.asarray(lam), 0.3
    )
    la = smoothed_ce_numpy(LOGITS, LABELS).mean()
    lb = smoothed_ce_numpy(LOGITS, LABELS_B).mean()
    assert float(got) == pytest.approx(lam * la + (1 - lam) * lb, rel=1e-5)


def test_soft_smoothing_value():
    """mean(CE_i · (1 + max softmax_i))."""
    got = soft_smoothing_loss(jnp.asarray(LOGITS), jnp.asarray(LABELS))
    assert float(got) == pytest.approx(soft_loss_numpy(LOGITS, LABELS), rel=1e-5)


def test_soft_smoothing_hand_gradient_by_finite_differences():
    """The hand-derived gradient (used below) checks out against central differences."""
    z, y = SMALL_LOGITS, SMALL_LABELS
    fd = np.zeros_like(z)
    h = 1e-6
    for idx in np.ndindex(*z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += h
        zm[idx] -= h
        fd[idx] = (soft_loss_numpy(zp, y) - soft_loss_numpy(zm, y)) / (2 * h)
    np.testing.assert_allclose(soft_grad_numpy(z, y), fd, rtol=1e-5, atol=1e-8)


def test_soft_smoothing_gradient_flows_through_max():
    """jax.grad includes the max-softmax term; detaching the max gives a different gradient."""
    z, y = SMALL_LOGITS.astype(np.float32), SMALL_LABELS
    g = np.asarray(jax.grad(soft_smoothing_loss)(jnp.asarray(z), jnp.asarray(y)))
    np.testing.assert_allclose(g, soft_grad_numpy(z, y), rtol=1e-4, atol=1e-6)

    def detached(logits, labels):
        lp = jax.nn.log_softmax(logits)
        ce = -jnp.take_along_axis(lp, labels[:, None], axis=-1)[:, 0]
        conf = jax.lax.stop_gradient(jnp.max(jnp.exp(lp), axis=-1))
        return jnp.mean(ce * (1 + conf))

    gd = np.asarray(jax.grad(detached)(jnp.asarray(z), jnp.asarray(y)))
    p = np.exp(log_softmax(z))
    expected_detached = (p - np.eye(5)[y]) * (1 + p.max(-1))[:, None] / len(y)
    np.testing.assert_allclose(gd, expected_detached, rtol=1e-4, atol=1e-6)
    assert np.max(np.abs(g - gd)) > 1e-2


def test_soft_smoothing_gradient_against_torch():
    """Same gradient as PyTorch autograd with the max not detached."""
    torch = pytest.importorskip("torch")
    z = torch.tensor(SMALL_LOGITS, requires_grad=True)
    lp = torch.log_softmax(z, dim=-1)
    ce = -lp[torch.arange(4), torch.from_numpy(SMALL_LABELS)]
    loss = (ce * (1 + lp.exp().max(dim=-1).values)).mean()
    loss.backward()
    g = jax.grad(soft_smoothing_loss)(
        jnp.asarray(SMALL_LOGITS, jnp.float32), jnp.asarray(SMALL_LABELS)
    )
    np.testing.assert_allclose(np.asarray(g), z.grad.numpy(), rtol=1e-4, atol=1e-6)
    assert float(
        soft_smoothing_loss(jnp.asarray(SMALL_LOGITS, jnp.float32), jnp.asarray(SMALL_LABELS))
    ) == pytest.approx(loss.item(), rel=1e-5)
