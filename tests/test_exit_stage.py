"""The exit-head stage trains only the head; the frozen network's BN statistics keep moving."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from micronet_jax.models.architecture import build_architecture
from micronet_jax.models.efficientnet import MicroNet, init_variables
from micronet_jax.train import pruning
from micronet_jax.train.optim import make_optimizer
from micronet_jax.train.state import create_exit_state, full_variables
from micronet_jax.train.steps import StepConfig, exit_train_step

TINY_BLOCKS = (
    "r1_k3_s1_e1_i8_o8_se0.25",
    "r1_k3_s2_e2_i8_o16_se0.25",
    "r1_k3_s1_e2_i16_o16_se0.25",
)


def _trees_equal(a, b) -> bool:
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.mark.slow
def test_frozen_backbone_head_trains_and_bn_statistics_move():
    arch = build_architecture(
        TINY_BLOCKS, width=1.0, resolution=1.0, head_filters=32, num_classes=10, exit_block=1
    )
    model = MicroNet(arch)
    variables = init_variables(model, jax.random.key(0))
    tx = make_optimizer(0.13, 10, 4)
    state = create_exit_state(model.apply, variables, tx, seed=0)
    before = jax.tree.map(np.asarray, full_variables(state))
    step = jax.jit(functools.partial(exit_train_step, cfg=StepConfig(mixup_alpha=0.0)))
    rng = np.random.default_rng(0)
    for i in range(3):
        batch = {
            "image": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
            "label": rng.integers(0, 10, (16,)).astype(np.int32),
        }
        state, metrics = step(state, batch, jax.random.key(i))
        assert np.isfinite(float(metrics["loss"]))
    after = full_variables(state)
    main_before = {k: v for k, v in before["params"].items() if k != "exit_head"}
    main_after = {k: v for k, v in after["params"].items() if k != "exit_head"}
    assert _trees_equal(main_before, main_after), "the frozen network's params changed"
    assert not _trees_equal(before["params"]["exit_head"], after["params"]["exit_head"])
    for name in ("stem_bn", "blocks_0", "blocks_2", "head_bn"):  # before and after the exit
        assert not _trees_equal(before["batch_stats"][name], after["batch_stats"][name]), name
    assert int(state.step) == 3


@pytest.mark.slow
@pytest.mark.shared
def test_original_pruned_network_is_a_fixed_point(original_checkpoints):
    """One 64% round on the released network keeps its 168,417 weights and prunes nothing else."""
    from micronet_jax.models.torch_import import load_original

    ckpt = load_original(original_checkpoints / "first_submission" / "trained_model.pth")
    params = ckpt.variables["params"]
    masks = pruning.prune_masks(params, 64.0, select=pruning.main_network)
    kept = 0
    for (path, w), m in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(masks), strict=True
    ):
        name = pruning.path_name(path)
        w, m = np.asarray(w), np.asarray(m)
        if w.ndim > 1 and pruning.main_network(name):
            np.testing.assert_array_equal(m, (w != 0).astype(m.dtype), err_msg=name)
            kept += int(m.sum())
        else:
            assert np.all(m == 1), name
    assert kept == 168_417
