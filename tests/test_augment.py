"""Crop, flip, normalise, mixup and the composed train/eval transforms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from micronet_jax.data import augment
from micronet_jax.data.augment import CIFAR100_MEAN, CIFAR100_STD


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    """Random images with no zero value, so zero padding is recognisable."""
    return np.random.default_rng(0).integers(1, 256, (256, 32, 32, 3), dtype=np.uint8)


def _find_shift(out: np.ndarray, image: np.ndarray) -> tuple[int, int] | None:
    """(dy, dx) with out[y, x] = image[y + dy, x + dx] inside and 0 outside, if any."""
    for dy in range(-4, 5):
        for dx in range(-4, 5):
            padded = np.zeros((40, 40, 3), np.uint8)
            padded[4:36, 4:36] = image
            if np.array_equal(out, padded[4 + dy : 36 + dy, 4 + dx : 36 + dx]):
                return dy, dx
    return None


def test_random_crop_shifts_within_four_pixels_with_zero_padding(batch):
    out = np.asarray(jax.jit(augment.random_crop)(jax.random.key(1), batch))
    shifts = [_find_shift(o, x) for o, x in zip(out, batch, strict=True)]
    assert None not in shifts
    dy, dx = np.array(shifts).T
    assert {dy.min(), dy.max(), dx.min(), dx.max()} == {-4, 4}  # the whole range is used
    assert np.mean((dy != 0) | (dx != 0)) > 0.9
    assert (out == 0).any(axis=-1).sum() > 0  # the zero padding shows


def test_random_flip_mirrors_about_half_of_the_images(batch):
    out = np.asarray(jax.jit(augment.random_flip)(jax.random.key(2), batch))
    flipped = np.all(out == batch[:, :, ::-1], axis=(1, 2, 3))
    kept = np.all(out == batch, axis=(1, 2, 3))
    assert np.all(flipped ^ kept)
    assert abs(flipped.mean() - 0.5) < 5 * 0.5 / np.sqrt(len(batch))


def test_normalise_and_eval_transform(batch):
    expected = (batch / 255.0 - np.array(CIFAR100_MEAN)) / np.array(CIFAR100_STD)
    out = augment.eval_transform(jnp.asarray(batch))
    assert out.dtype == jnp.float32 and out.shape == batch.shape
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out, augment.normalize(jnp.asarray(batch)))


def test_mixup_mixes_with_a_permutation_and_is_reproducible():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(64, 4, 4, 3)), jnp.float32)
    labels = jnp.arange(64)
    mix = jax.jit(augment.mixup)
    mixed, labels_a, labels_b, lam = mix(jax.random.key(4), x, labels)
    assert 0.0 <= float(lam) <= 1.0
    np.testing.assert_array_equal(labels_a, labels)
    perm = np.asarray(labels_b)
    assert sorted(perm) == list(range(64)) and np.any(perm != np.arange(64))
    np.testing.assert_allclose(mixed, lam * x + (1 - lam) * x[perm], rtol=1e-6, atol=1e-6)
    again = mix(jax.random.key(4), x, labels)
    np.testing.assert_array_equal(again[0], mixed)
    np.testing.assert_array_equal(again[2], labels_b)
    other = mix(jax.random.key(5), x, labels)
    assert float(other[3]) != float(lam)


def test_mixup_lambda_is_uniform_for_alpha_one():
    keys = jax.random.split(jax.random.key(6), 2000)
    x, labels = jnp.zeros((8, 2, 2, 3)), jnp.arange(8)
    lams = np.asarray(jax.jit(jax.vmap(lambda k: augment.mixup(k, x, labels)[3]))(keys))
    assert abs(lams.mean() - 0.5) < 5 * np.sqrt(1 / 12 / len(lams))
    assert abs(np.mean(lams < 0.25) - 0.25) < 5 * np.sqrt(0.25 * 0.75 / len(lams))


def _unnormalise(x: jax.Array) -> np.ndarray:
    x = np.asarray(x) * np.array(CIFAR100_STD) + np.array(CIFAR100_MEAN)
    return np.round(x * 255.0).astype(np.uint8)


def test_train_transform_without_autoaugment_is_crop_flip_normalise(batch):
    x = batch[:64]
    out = _unnormalise(
        jax.jit(augment.train_transform, static_argnames="autoaugment")(
            jax.random.key(7), x, autoaugment=False
        )
    )
    for o, image in zip(out, x, strict=True):
        assert _find_shift(o, image) is not None or _find_shift(o, image[:, ::-1]) is not None


def test_train_transform_runs_autoaugment_before_the_crop(batch):
    x = batch[:64]
    always_invert = (("invert", 1.0, 0, "invert", 0.0, 0),)
    out = _unnormalise(
        jax.jit(augment.train_transform, static_argnames="policy")(
            jax.random.key(8), x, policy=always_invert
        )
    )
    for o, image in zip(out, 255 - x, strict=True):
        # the inverted image is cropped with black padding (inverting after would give white)
        assert _find_shift(o, image) is not None or _find_shift(o, image[:, ::-1]) is not None
    assert (out == 0).all(axis=-1).any()


@pytest.mark.slow
def test_train_transform_is_reproducible_from_its_key(batch):
    transform = jax.jit(augment.train_transform)
    x = batch[:32]
    a = transform(jax.random.key(9), x)
    b = transform(jax.random.key(9), x)
    c = transform(jax.random.key(10), x)
    assert a.dtype == jnp.float32 and a.shape == x.shape
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
