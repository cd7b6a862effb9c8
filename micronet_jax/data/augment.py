"""Train-time augmentation on the device: AutoAugment → crop → flip → normalise, and mixup.

The transforms take uint8 NHWC batches, mixup the normalised float batch; all draw from a
`jax.random` key, so a (seed, step) pair derived with ``fold_in`` reproduces a batch exactly,
and all jit. Inside `train_transform` the images stay planar (N, C, H, W), the
layout the AutoAugment ops run fastest in, until normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from micronet_jax.data import policy as policy_lib
from micronet_jax.data.autoaugment import from_planar, to_planar

CROP_PADDING = 4
# The original's normalisation (CIFAR-100 training-set statistics), used for every data set.
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
MIXUP_ALPHA = 1.0


def _crop_planar(key: jax.Array, images: jax.Array, padding: int) -> jax.Array:
    """`random_crop` on a planar batch: one slice of the padded image per image."""
    n, ch, h, w = images.shape
    offsets = jax.random.randint(key, (n, 2), 0, 2 * padding + 1)
    padded = jnp.pad(images, ((0, 0), (0, 0), (padding, padding), (padding, padding)))

    def crop(image: jax.Array, offset: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(image, (0, offset[0], offset[1]), (ch, h, w))

    return jax.vmap(crop)(padded, offsets)


def _flip_planar(key: jax.Array, images: jax.Array) -> jax.Array:
    """`random_flip` on a planar batch."""
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
    return jnp.where(flip[:, None, None, None], images[..., ::-1], images)


def random_crop(key: jax.Array, images: jax.Array, padding: int = CROP_PADDING) -> jax.Array:
    """Per image (N, H, W, C), a crop of the original size from the image zero-padded by
    ``padding``: offsets uniform in 0..2·padding."""
    return from_planar(_crop_planar(key, to_planar(images), padding))


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
    """Per image (N, H, W, C), a horizontal flip with probability 0.5."""
    return from_planar(_flip_planar(key, to_planar(images)))


def normalize(images: jax.Array) -> jax.Array:
    """uint8 → float32 (x / 255 − mean) / std, as ToTensor + Normalize."""
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(CIFAR100_MEAN, jnp.float32)) / jnp.asarray(CIFAR100_STD, jnp.float32)


def normalize_affine(images: jax.Array) -> jax.Array:
    """`normalize` as one multiply and one add per pixel (x · 1/(255·std) − mean/std): what
    an exported graph computes, with no division (an int8 converter cannot quantise one)."""
    std = np.asarray(CIFAR100_STD, np.float32)
    scale = 1.0 / (255.0 * std)
    offset = -np.asarray(CIFAR100_MEAN, np.float32) / std
    return images.astype(jnp.float32) * jnp.asarray(scale) + jnp.asarray(offset)


def mixup(
    key: jax.Array, images: jax.Array, labels: jax.Array, alpha: float = MIXUP_ALPHA
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One λ ~ Beta(α, α) per batch, partner = a random permutation of the batch.

    Returns (λ·x + (1 − λ)·x[perm], labels, labels[perm], λ); the loss is
    λ·L(labels_a) + (1 − λ)·L(labels_b).
    """
    k_lam, k_perm = jax.random.split(key)
    lam = jax.random.beta(k_lam, alpha, alpha)
    perm = jax.random.permutation(k_perm, images.shape[0])
    mixed = lam * images + (1.0 - lam) * images[perm]
    return mixed, labels, labels[perm], lam


def train_transform(
    key: jax.Array,
    images: jax.Array,
    *,
    autoaugment: bool = True,
    policy: policy_lib.Policy | Sequence[Sequence] | None = None,
) -> jax.Array:
    """AutoAugment → random crop (zero padding 4) → flip → normalise; float32 NHWC."""
    k_policy, k_crop, k_flip = jax.random.split(key, 3)
    planar = to_planar(images)
    if autoaugment:
        planar = policy_lib.apply_policy_planar(k_policy, planar, policy)
    planar = _flip_planar(k_flip, _crop_planar(k_crop, planar, CROP_PADDING))
    return normalize(from_planar(planar))


def eval_transform(images: jax.Array) -> jax.Array:
    """Test time: normalise only."""
    return normalize(images)
