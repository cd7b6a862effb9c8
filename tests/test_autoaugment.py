"""The 14 AutoAugment ops against Pillow on real CIFAR-10 images, and the batched stage path
against the per-op path."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pil_reference as ref
import pytest

from micronet_jax.data import autoaugment as aa
from micronet_jax.data.policy import CIFAR100_ROWS

NUM_IMAGES = 200
# Resampling ops are held to a mean absolute difference of at most 1 grey level with 95% of
# values within 2; on top of that, every op is within 1 grey level everywhere.
RESAMPLING_OPS = {"shearX", "shearY", "translateX", "translateY", "rotate", "sharpness"}
# Shears run Pillow's float64 bicubic in float32: where a source coordinate is an exact
# integer, the truncated result can land one grey level apart.
SHARE_DIFFERENT = {"shearX": 5e-3, "shearY": 5e-3}


@pytest.fixture(scope="module")
def images(cifar10_archive) -> np.ndarray:
    return ref.cifar10_test_images(str(cifar10_archive))[0][:NUM_IMAGES]


def _policy_values(name: str) -> list[float]:
    """The values the CIFAR-100 policy gives ``name`` (both signs), plus magnitudes 0, 5, 9."""
    mags = {row[k + 2] for row in CIFAR100_ROWS for k in (0, 3) if row[k] == name} | {0, 5, 9}
    values = {ref.op_value(name, m, sign) for m in sorted(mags) for sign in (1, -1)}
    return sorted(values)


VALUES = {name: _policy_values(name) for name in aa.OP_NAMES}
VALUES["posterize"] += [3, 2, 1]


def _pil(name: str, images: np.ndarray, value: float) -> np.ndarray:
    return np.stack([ref.apply_op(name, image, value) for image in images])


@functools.cache
def _per_op(name: str):
    """The per-op function mapped over images and their values, compiled once per op."""
    return jax.jit(jax.vmap(aa.OPS[name]))


def test_registry_holds_the_fourteen_ops():
    assert sorted(aa.OPS) == sorted(
        [
            "shearX",
            "shearY",
            "translateX",
            "translateY",
            "rotate",
            "color",
            "contrast",
            "brightness",
            "sharpness",
            "posterize",
            "solarize",
            "autocontrast",
            "equalize",
            "invert",
        ]
    )
    assert set(aa.KINDS) == set(aa.OPS)


@pytest.mark.shared
@pytest.mark.parametrize("name", aa.OP_NAMES)
def test_op_matches_pillow(name, images):
    for value in VALUES[name]:
        ours = np.asarray(_per_op(name)(images, np.full(len(images), value, np.float32)))
        ours = ours.astype(int)
        diff = np.abs(ours - _pil(name, images, value))
        where = f"{name}({value}): max {diff.max()}, mean {diff.mean():.5f}"
        if name in RESAMPLING_OPS:
            assert diff.mean() <= 1.0, where
            assert np.mean(diff <= 2) >= 0.95, where
        assert diff.max() <= 1, where
        # Pillow's rounding is reproduced: a systematic slip would move far more values.
        assert np.mean(diff > 0) <= SHARE_DIFFERENT.get(name, 1e-4), where


@pytest.mark.parametrize("name", ["rotate", "sharpness", "equalize"])
def test_single_image_op_jits_with_a_traced_value(name):
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    value = 1.7 if name == "sharpness" else 23.0
    ours = jax.jit(aa.OPS[name])(image, value)
    assert ours.shape == image.shape and ours.dtype == jnp.uint8
    assert np.abs(np.asarray(ours, int) - ref.apply_op(name, image, value)).max() <= 1


def test_geometric_fill_is_gray():
    image = np.full((32, 32, 3), 7, np.uint8)
    moved = np.asarray(jax.jit(aa.OPS["translateX"])(image, 40.0))
    assert (moved == aa.FILL).all()
    turned = np.asarray(jax.jit(aa.OPS["rotate"])(image, 30.0))
    assert (turned[0, 0] == aa.FILL).all() and (turned[16, 16] == 7).all()
    sheared = np.asarray(jax.jit(aa.OPS["shearX"])(image, 0.3))
    assert (sheared[31, 31] == aa.FILL).all() and (sheared[0, 0] == 7).all()


def test_identity_parameters_leave_images_unchanged():
    batch = np.random.default_rng(1).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    matrices = jnp.tile(jnp.asarray([1.0, 0, 0, 0, 1, 0]), (3, 1))
    modes = jnp.asarray([aa.NEAREST, aa.CUBIC_X, aa.CUBIC_Y])
    np.testing.assert_array_equal(jax.jit(aa.affine_warp)(batch, matrices, modes), batch)
    np.testing.assert_array_equal(jax.jit(aa.blend)(batch * 0, batch, jnp.ones(3)), batch)


def _range_image(lo: int, hi: int, rng) -> np.ndarray:
    """A 16×16 image whose every channel spans exactly lo..hi, with every value in between."""
    flat = np.concatenate([np.arange(lo, hi + 1), rng.integers(lo, hi + 1, 256)])[:256]
    planes = [rng.permutation(flat) for _ in range(3)]
    return np.stack(planes, -1).reshape(16, 16, 3).astype(np.uint8)


def test_autocontrast_reproduces_pillows_float64_rounding():
    rng = np.random.default_rng(2)
    # (0, 25): Pillow maps 25 to 254, not 255; the others are random ranges
    pairs = [(0, 25), (0, 105), (3, 108), (0, 255), (17, 17)]
    pairs += [tuple(sorted(rng.integers(0, 256, 2))) for _ in range(195)]
    batch = np.stack([_range_image(lo, hi, rng) for lo, hi in pairs])
    ours = np.asarray(jax.jit(jax.vmap(aa.OPS["autocontrast"]))(batch, jnp.zeros(len(batch))))
    np.testing.assert_array_equal(ours, _pil("autocontrast", batch, 0))
    assert ours[0].max() == 254


def test_equalize_edge_cases_match_pillow():
    rng = np.random.default_rng(3)
    flat = np.full((16, 16, 3), 77, np.uint8)
    two = np.where(rng.random((16, 16, 3)) < 0.5, 10, 200).astype(np.uint8)
    skewed = np.where(rng.random((16, 16, 3)) < 0.98, 255, rng.integers(0, 256, (16, 16, 3)))
    batch = np.stack([flat, two, skewed.astype(np.uint8)])
    ours = np.asarray(jax.jit(jax.vmap(aa.OPS["equalize"]))(batch, jnp.zeros(3)))
    np.testing.assert_array_equal(ours, _pil("equalize", batch, 0))


def test_capacity_holds_the_expected_count_with_margin():
    assert aa.capacity_for(128, 1.0) == 128
    assert 0 < aa.capacity_for(128, 0.0) <= 4
    cap = aa.capacity_for(128, 0.28)
    assert 128 * 0.28 + 2 * np.sqrt(128 * 0.28 * 0.72) < cap < 128 * 0.5 and cap % 4 == 0


@pytest.fixture(scope="module")
def stage_case(images):
    """Random ops, values and firing per image, with the per-op and Pillow results."""
    rng = np.random.default_rng(4)
    names = aa.OP_NAMES
    op_index = rng.integers(0, len(names), NUM_IMAGES)
    exact = np.array([rng.choice(VALUES[names[j]]) for j in op_index])  # float64, for PIL
    values = exact.astype(np.float32)
    fired = rng.random(NUM_IMAGES) < 0.8
    per_op = images.copy()
    for j, name in enumerate(names):
        chosen = fired & (op_index == j)
        per_op[chosen] = _per_op(name)(images[chosen], values[chosen])
    cases = zip(images, op_index, exact, fired, strict=True)
    pil = np.stack([ref.apply_op(names[j], x, v) if f else x for x, j, v, f in cases])
    return names, op_index, values, fired, per_op, pil


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize(
    "capacities",
    [
        None,
        {"warp": 64, "lut": 64, "blend": 64, "equalize": 32, "autocontrast": 32},
        {"warp": 8, "lut": 8, "blend": 8, "equalize": 8, "autocontrast": 8},
    ],
    ids=["full", "compacted", "overflow"],
)
def test_batched_stage_equals_per_op_path_and_pillow(images, stage_case, capacities):
    names, op_index, values, fired, per_op, pil = stage_case
    stage = jax.jit(lambda x, j, v, f: aa.apply_stage(x, names, j, v, f, capacities))
    ours = stage(aa.to_planar(jnp.asarray(images)), op_index, values, fired)
    ours = np.asarray(aa.from_planar(ours))
    np.testing.assert_array_equal(ours, per_op)
    diff = np.abs(ours.astype(int) - pil)
    assert diff.max() <= 1 and np.mean(diff > 0) <= 1e-3, diff.max()


@pytest.mark.parametrize("name", aa.WARP_OPS + ("sharpness", "contrast"))
def test_non_square_images_match_pillow(name):
    rng = np.random.default_rng(5)
    batch = rng.integers(0, 256, (8, 20, 28, 3), dtype=np.uint8)
    value = {"rotate": 17.0, "translateX": -5.3, "translateY": 6.6}.get(name, 0.27)
    value = 1.45 if name in ("sharpness", "contrast") else value
    ours = np.asarray(_per_op(name)(batch, np.full(len(batch), value, np.float32)))
    diff = np.abs(ours.astype(int) - _pil(name, batch, value))
    assert diff.max() <= 1 and np.mean(diff > 0) <= 1e-3, (name, diff.max())
