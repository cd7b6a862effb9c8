"""Layer-wise normalised global magnitude pruning against hand computations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from micronet_jax.errors import ConfigError
from micronet_jax.train.optim import make_optimizer
from micronet_jax.train.pruning import (
    DEFAULT_TARGETS,
    exit_head,
    global_sparsity,
    global_threshold,
    main_network,
    prune_masks,
    sparsity_by_layer,
    validate_targets,
)
from micronet_jax.train.state import apply_masks


def toy_params(seed: int = 0) -> dict:
    """Kernels of different sizes and scales, a bias, a BN scale/bias and an exit head."""
    rng = np.random.default_rng(seed)
    f32 = lambda a: np.asarray(a, np.float32)
    return {
        "conv": {
            "kernel": f32(rng.standard_normal((3, 3, 2, 4)) * 5),
            "bias": f32(rng.standard_normal(4) * 1e-3),
        },
        "bn": {"scale": f32(rng.uniform(1e-4, 1e-3, 4)), "bias": f32(rng.standard_normal(4))},
        "dw": {"kernel": f32(rng.standard_normal((3, 3, 1, 4)) * 0.01)},
        "fc": {"kernel": f32(rng.standard_normal((10, 5))), "bias": f32(np.zeros(5))},
        "exit_head": {
            "fc": {"kernel": f32(rng.standard_normal((6, 3))), "bias": f32(rng.standard_normal(3))}
        },
    }


MAIN_KERNELS = (("conv", "kernel"), ("dw", "kernel"), ("fc", "kernel"))


def hand_masks(params: dict, percent: float, kernels=MAIN_KERNELS) -> dict:
    """Scores |w|/‖w‖₂ per tensor, np.percentile over all of them, keep score > threshold."""

    def get(path):
        leaf = params
        for k in path:
            leaf = leaf[k]
        return np.asarray(leaf, np.float64)

    scores = {path: np.abs(get(path)) / np.linalg.norm(get(path)) for path in kernels}
    threshold = np.percentile(np.concatenate([s.ravel() for s in scores.values()]), percent)
    return {path: (s > threshold).astype(np.float32) for path, s in scores.items()}


def leaf(tree, path):
    for k in path:
        tree = tree[k]
    return np.asarray(tree)


def test_hand_worked_example():
    """Normalisation beats raw magnitude; the threshold interpolates linearly; keep is strict.

    A = [3, 4] -> 0.6, 0.8; B = 10·ones(2×2) -> 0.5 × 4; C = [1, 2, 2] -> 1/3, 2/3, 2/3.
    Sorted: 1/3, .5, .5, .5, .5, .6, 2/3, 2/3, .8. 70th percentile: position 5.6 ->
    0.6 + 0.6·(2/3 − 0.6) = 0.64, so A's 3 goes, C's twos stay, all of B goes.
    """
    params = {
        "A": {"kernel": np.array([[3.0, 4.0]], np.float32)},
        "B": {"kernel": np.full((2, 2), 10.0, np.float32)},
        "C": {"kernel": np.array([[1.0, 2.0, 2.0]], np.float32)},
    }
    assert global_threshold(params, 70) == pytest.approx(0.64)
    masks = prune_masks(params, 70)
    np.testing.assert_array_equal(masks["A"]["kernel"], [[0, 1]])
    np.testing.assert_array_equal(masks["B"]["kernel"], np.zeros((2, 2)))
    np.testing.assert_array_equal(masks["C"]["kernel"], [[0, 1, 1]])
    # 40th percentile: position 3.2 -> 0.5 exactly; B's scores equal it and are pruned (strict).
    assert global_threshold(params, 40) == pytest.approx(0.5)
    masks = prune_masks(params, 40)
    np.testing.assert_array_equal(masks["A"]["kernel"], [[1, 1]])
    np.testing.assert_array_equal(masks["B"]["kernel"], np.zeros((2, 2)))
    np.testing.assert_array_equal(masks["C"]["kernel"], [[0, 1, 1]])


def test_masks_match_np_percentile():
    """Random toy tree: masks equal the hand computation; 1-dim leaves all ones."""
    params = toy_params()
    for percent in (10, 37.5, 64, 90):
        masks = prune_masks(params, percent)
        expected = hand_masks(params, percent)
        for path, m in expected.items():
            np.testing.assert_array_equal(leaf(masks, path), m, err_msg=f"{percent} {path}")
        for path in (
            ("conv", "bias"),
            ("bn", "scale"),
            ("bn", "bias"),
            ("fc", "bias"),
            ("exit_head", "fc", "bias"),
            ("exit_head", "fc", "kernel"),
        ):
            assert np.all(leaf(masks, path) == 1), path
        assert jax.tree_util.tree_structure(masks) == jax.tree_util.tree_structure(params)
    # The tiny-valued BN scale and bias never enter the ranking, whatever the target.
    masks = prune_masks(params, 99)
    assert np.all(leaf(masks, ("bn", "scale")) == 1) and np.all(leaf(masks, ("conv", "bias")) == 1)


def test_layer_normalisation_spares_small_layers():
    """The 0.01-scaled depthwise kernel is not wiped out, unlike under raw magnitude."""
    params = toy_params()
    masks = prune_masks(params, 50)
    assert 0 < leaf(masks, ("dw", "kernel")).mean() < 1
    raw = np.concatenate([np.abs(leaf(params, p)).ravel() for p in MAIN_KERNELS])
    raw_threshold = np.percentile(raw, 50)
    assert np.all(np.abs(leaf(params, ("dw", "kernel"))) <= raw_threshold)


def test_second_round_counts_earlier_zeros():
    """Round 2 on masked params: earlier zeros enter the percentile (cumulative target)."""
    params = toy_params(1)
    masks1 = prune_masks(params, 30)
    pruned = apply_masks(params, masks1)
    masks2 = prune_masks(pruned, 50, masks1)
    expected = hand_masks(jax.tree_util.tree_map(np.asarray, pruned), 50)
    for path, m in expected.items():
        np.testing.assert_array_equal(leaf(masks2, path), m, err_msg=str(path))
        # Earlier zeros stay pruned.
        assert np.all(leaf(masks2, path)[leaf(masks1, path) == 0] == 0)
    n = sum(leaf(params, p).size for p in MAIN_KERNELS)
    zeros = sum(int((leaf(masks2, p) == 0).sum()) for p in MAIN_KERNELS)
    assert abs(zeros / n - 0.5) <= 1 / n
    # Not 30% then 50% of the rest (65%).
    assert zeros / n < 0.6
    assert global_sparsity(apply_masks(pruned, masks2)) == pytest.approx(zeros / n)


def test_select_filters():
    """main_network leaves the exit head's masks as they were; exit_head touches only it."""
    params = toy_params(2)
    old = jax.tree_util.tree_map(lambda p: np.ones(np.shape(p), np.float32), params)
    old["exit_head"]["fc"]["kernel"][0, 0] = 0.0  # an earlier exit-head round's mask
    old["conv"]["kernel"][0, 0, 0, 0] = 0.0
    masks = prune_masks(params, 40, old, select=main_network)
    np.testing.assert_array_equal(
        masks["exit_head"]["fc"]["kernel"], old["exit_head"]["fc"]["kernel"]
    )
    for path, m in hand_masks(params, 40).items():
        np.testing.assert_array_equal(leaf(masks, path), m)

    masks = prune_masks(params, 50, old, select=exit_head)
    for path in MAIN_KERNELS:
        np.testing.assert_array_equal(leaf(masks, path), leaf(old, path))
    kernels = (("exit_head", "fc", "kernel"),)
    np.testing.assert_array_equal(
        leaf(masks, kernels[0]), hand_masks(params, 50, kernels)[kernels[0]]
    )
    assert leaf(masks, kernels[0]).sum() == 9  # 18 weights, no ties: 50% -> 9 kept
    assert np.all(leaf(masks, ("exit_head", "fc", "bias")) == 1)
    assert main_network("blocks_3/expand_conv/kernel") and not main_network("exit_head/fc/kernel")
    assert exit_head("exit_head/fc/kernel") and not exit_head("fc/kernel")
    with pytest.raises(ConfigError):
        prune_masks({"fc": {"bias": np.ones(3, np.float32)}}, 50)


def test_validate_targets():
    """Increasing percentages in [0, 100) pass; anything else is a ConfigError."""
    assert validate_targets(DEFAULT_TARGETS) == (10, 20, 30, 40, 50, 52.5, 55, 57.5, 60, 62, 64)
    assert validate_targets([0, 99.9]) == (0.0, 99.9)
    for bad in ([10, 10], [20, 10], [10, 30, 20], [-1], [100], [50, 120]):
        with pytest.raises(ConfigError):
            validate_targets(bad)
    with pytest.raises(ConfigError):
        prune_masks(toy_params(), 100)


@pytest.mark.parametrize("seed", range(6))
def test_property_sparsity_hits_target(seed):
    """Random trees and targets: global sparsity within 1/n of the target (no ties)."""
    rng = np.random.default_rng(100 + seed)
    params = {}
    for i in range(rng.integers(1, 5)):
        shape = tuple(int(s) for s in rng.integers(1, 6, size=rng.integers(2, 5)))
        params[f"layer{i}"] = {
            "kernel": (rng.standard_normal(shape) * rng.uniform(0.01, 10)).astype(np.float32),
            "bias": rng.standard_normal(shape[-1]).astype(np.float32),
        }
    n = sum(p["kernel"].size for p in params.values())
    masks = None
    current = params
    targets = np.sort(rng.choice(np.arange(5, 95, 0.5), size=3, replace=False))
    for target in targets:
        masks = prune_masks(current, float(target), masks)
        current = apply_masks(params, masks)
        zeros = sum(int((m["kernel"] == 0).sum()) for m in masks.values())
        assert abs(zeros / n - target / 100) <= 1 / n + 1e-12, (target, zeros, n)
        assert global_sparsity(current) == pytest.approx(zeros / n)
        assert all(np.all(m["bias"] == 1) for m in masks.values())
    by_layer = sparsity_by_layer(current)
    assert set(by_layer) == {f"{k}/kernel" for k in params}


@pytest.mark.slow
def test_masked_sgd_keeps_pruned_weights_zero():
    """make_optimizer + apply_masks after every update: pruned weights stay exactly zero."""
    params = jax.tree_util.tree_map(jnp.asarray, toy_params(3))
    masks = prune_masks(params, 50)
    params = apply_masks(params, masks)
    target = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.7), params)
    loss = lambda p: sum(
        jax.tree_util.tree_leaves(
            jax.tree_util.tree_map(lambda a, b: jnp.sum((a - b) ** 2), p, target)
        )
    )
    tx = make_optimizer(0.1, epochs=3, steps_per_epoch=2)
    opt_state = tx.init(params)
    grad = jax.jit(jax.grad(loss))
    start = params
    for _ in range(4):
        updates, opt_state = tx.update(grad(params), opt_state, params)
        unmasked = optax.apply_updates(params, updates)
        params = apply_masks(unmasked, masks)
    for path in MAIN_KERNELS:
        m, p = leaf(masks, path), leaf(params, path)
        assert np.all(p[m == 0] == 0.0), path
        assert np.all(leaf(unmasked, path)[m == 0] != 0.0)  # the gradient pushed them
        assert np.all(p[m == 1] != leaf(start, path)[m == 1])  # the rest trained
    assert np.mean(leaf(params, ("conv", "bias")) != leaf(start, ("conv", "bias"))) == 1.0
