"""The CIFAR-100 policy as data, its magnitudes, its validation, its sampling, and the whole
policy against the original's per-image PIL code."""

from __future__ import annotations

import re

import jax
import numpy as np
import pil_reference as ref
import pytest

from micronet_jax.data import autoaugment as aa
from micronet_jax.data import policy as pol
from micronet_jax.errors import ConfigError

NUM_IMAGES = 200


@pytest.fixture(scope="module")
def images(cifar10_archive) -> np.ndarray:
    return ref.cifar10_test_images(str(cifar10_archive))[0][:NUM_IMAGES]


def _spec_rows(spec: str) -> list[tuple]:
    """The 25-row policy table of the specification: | # | op1 | p1 | m1 | op2 | p2 | m2 |."""
    pattern = r"^\| (\d+) \| (\w+) \| ([\d.]+) \| (\d) \| (\w+) \| ([\d.]+) \| (\d) \|$"
    rows = []
    for match in re.finditer(pattern, spec, re.MULTILINE):
        _, op1, p1, m1, op2, p2, m2 = match.groups()
        rows.append((op1, float(p1), int(m1), op2, float(p2), int(m2)))
    return rows


@pytest.mark.shared
def test_policy_is_the_spec_table(cifar10_archive):
    spec = (cifar10_archive.parents[1] / "SPEC.md").read_text()
    rows = _spec_rows(spec)
    assert len(rows) == 25
    assert pol.CIFAR100_ROWS == tuple(rows)
    assert pol.CIFAR100_POLICY.rows == tuple(rows)


def test_magnitude_tables():
    np.testing.assert_array_equal(pol.MAGNITUDES["posterize"], [8, 8, 7, 7, 6, 6, 5, 5, 4, 4])
    np.testing.assert_allclose(pol.MAGNITUDES["solarize"], [256 * (9 - m) / 9 for m in range(10)])
    np.testing.assert_allclose(pol.MAGNITUDES["rotate"], [30 * m / 9 for m in range(10)])
    np.testing.assert_allclose(pol.MAGNITUDES["shearY"], [0.3 * m / 9 for m in range(10)])
    assert pol.op_value("translateX", 9, True, 32, 32) == pytest.approx(-150 / 331 * 32)
    assert pol.op_value("contrast", 9, True, 32, 32) == pytest.approx(0.1)
    assert pol.op_value("rotate", 9, True, 32, 32) == 30.0  # rotate is never negated


@pytest.mark.parametrize("name", aa.OP_NAMES)
def test_values_follow_the_originals_arithmetic(name):
    for m in range(10):
        for negative in (False, True):
            ours = pol.op_value(name, m, negative, 32, 32)
            assert ours == ref.op_value(name, m, -1 if negative else 1), (name, m, negative)


@pytest.mark.parametrize(
    "row, message",
    [
        (("sharpen", 0.5, 3, "invert", 0.5, 0), "unknown op 'sharpen'"),
        (("invert", 1.5, 3, "invert", 0.5, 0), "probability 1.5"),
        (("invert", 0.5, 3, "invert", -0.1, 0), "probability -0.1"),
        (("invert", 0.5, 10, "invert", 0.5, 0), "magnitude 10"),
        (("invert", 0.5, 3, "invert", 0.5, 2.5), "magnitude 2.5"),
        (("invert", 0.5, 3, "invert", 0.5), "expected 6 fields"),
    ],
)
def test_bad_rows_raise_config_error(row, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        pol.Policy.from_rows([("color", 0.5, 1, "equalize", 0.5, 2), row])
    with pytest.raises(ConfigError, match="row 1"):
        pol.Policy.from_rows([("color", 0.5, 1, "equalize", 0.5, 2), row])


def test_empty_policy_is_rejected_and_numpy_scalars_are_accepted():
    with pytest.raises(ConfigError, match="empty"):
        pol.Policy.from_rows([])
    policy = pol.Policy.from_rows([["color", np.float32(0.5), np.int64(1), "invert", 1, 0]])
    assert policy.rows == (("color", 0.5, 1, "invert", 1.0, 0),)
    assert hash(policy) == hash(pol.Policy.from_rows(policy.rows))


def test_sampling_frequencies():
    n = 10_000
    d = jax.jit(pol.sample_policy_decisions, static_argnums=1)(jax.random.key(7), n)
    sub, fire, negative = map(np.asarray, d)
    counts = np.bincount(sub, minlength=25)
    assert counts.sum() == n and len(counts) == 25
    sd = np.sqrt(n * (1 / 25) * (24 / 25))
    assert np.all(np.abs(counts - n / 25) < 5 * sd), counts
    probs = pol.CIFAR100_POLICY.probabilities()
    for r in range(25):
        for stage in (0, 1):
            p = probs[r, stage]
            rate = fire[sub == r, stage].mean()
            assert abs(rate - p) <= 5 * np.sqrt(p * (1 - p) / counts[r]) + 1e-6, (r, stage)
    assert abs(negative.mean() - 0.5) < 5 * 0.5 / np.sqrt(2 * n)


def _pil_policy(images, decisions, rows) -> np.ndarray:
    """The original's sub-policy per image, with the given choices."""
    out = []
    for image, s, fire, negative in zip(images, *map(np.asarray, decisions), strict=True):
        row = rows[s]
        for stage in (0, 1):
            name, m = row[3 * stage], row[3 * stage + 2]
            if fire[stage]:
                value = ref.op_value(name, m, -1 if negative[stage] else 1)
                image = ref.apply_op(name, image, value)
        out.append(image)
    return np.stack(out)


@pytest.mark.slow
@pytest.mark.shared
def test_policy_matches_the_originals_pil_code(images):
    key = jax.random.key(3)
    ours = np.asarray(jax.jit(pol.apply_policy)(key, images))
    # the same key gives the choices; the original's PIL code applies them
    decisions = pol.sample_policy_decisions(key, NUM_IMAGES)
    diff = np.abs(ours.astype(int) - _pil_policy(images, decisions, pol.CIFAR100_ROWS))
    # a shear's rare one-level slip can be stretched by a second op (autocontrast, contrast)
    assert np.mean(diff > 0) <= 1e-3 and np.mean(diff > 1) <= 1e-4, diff.max()
    assert np.mean(np.any(ours != images, axis=(1, 2, 3))) > 0.5  # most images were changed


@pytest.mark.slow
@pytest.mark.shared
def test_a_policy_given_as_rows(images):
    rows = [["invert", 1.0, 0, "equalize", 1.0, 0], ["posterize", 1.0, 9, "solarize", 0.0, 0]]
    policy = pol.Policy.from_rows(rows)
    apply = jax.jit(pol.apply_policy, static_argnums=2)
    ours = np.asarray(apply(jax.random.key(0), images, policy))
    decisions = pol.sample_policy_decisions(jax.random.key(0), NUM_IMAGES, rows)
    np.testing.assert_array_equal(ours, _pil_policy(images, decisions, policy.rows))
    assert set(np.unique(decisions.subpolicy)) == {0, 1}


@pytest.mark.slow
def test_policy_runs_on_an_odd_batch_size():
    images = np.random.default_rng(1).integers(0, 256, (37, 32, 32, 3), dtype=np.uint8)
    assert pol.stage_capacities(pol.CIFAR100_POLICY, 37, 0)["warp"] < 37  # passes compacted
    out = jax.jit(pol.apply_policy)(jax.random.key(1), images)
    assert out.shape == images.shape and out.dtype == np.uint8
    assert np.any(out != images)


def test_rows_must_be_a_list():
    with pytest.raises(ConfigError, match="expected a list of rows"):
        pol.Policy.from_rows("invert")
