"""Data-parallel training on 8 simulated CPU devices equals single-device training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiny_run import xla_flags

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import functools, json, sys
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    from configs.tiny import get_config
    from micronet_jax.config import builders
    from micronet_jax.models.efficientnet import init_variables
    from micronet_jax.distributed import sharding
    from micronet_jax.train.loop import DeviceData, Schedule, run_epoch
    from micronet_jax.train.optim import make_optimizer
    from micronet_jax.train.state import create_train_state
    from micronet_jax.train.steps import StepConfig, train_step

    assert jax.device_count() == 8, jax.devices()
    config = get_config()
    model = builders.model_from_config(config)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 64).astype(np.int32)
    schedule = Schedule(epochs=1, batch_size=32, num_examples=64)
    step = functools.partial(train_step, cfg=StepConfig(autoaugment={autoaugment}))

    def run(mesh):
        variables = init_variables(model, jax.random.key(0))
        tx = make_optimizer(0.13, 2, schedule.steps_per_epoch)  # epoch 1 of 2: lr > 0
        state = create_train_state(model.apply, variables, tx, seed=0)
        if mesh is not None:
            state = sharding.replicate(state, mesh)
        data = DeviceData.from_numpy(images, labels, mesh=mesh)
        state, metrics = run_epoch(state, step, data, schedule, epoch=1)
        leaves = jax.tree_util.tree_leaves((state.params, state.batch_stats))
        return state, metrics, leaves

    mesh = sharding.make_mesh()
    single, m1, l1 = run(None)
    sharded, m2, l2 = run(mesh)
    kernel = sharded.params["stem_conv"]["kernel"]
    def rel(a, b):
        return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-2))
    diffs = [rel(np.asarray(a), np.asarray(b)) for a, b in zip(l1, l2)]
    init = jax.tree_util.tree_leaves(init_variables(model, jax.random.key(0))["params"])
    moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(init, jax.tree_util.tree_leaves(single.params)))
    print(json.dumps(dict(
        loss=[m1["loss"], m2["loss"]],
        max_rel_diff=max(diffs),
        n_leaves=len(diffs),
        moved=moved,
        kernel_devices=len(kernel.sharding.device_set),
        batch_spec_ok=DeviceData.from_numpy(images, labels, mesh).batch_sharding.spec
        == jax.sharding.PartitionSpec("data"),
    )))
    """
)


def run_child(autoaugment: bool) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags("--xla_force_host_platform_device_count=8")
    env["JAX_PLATFORMS"] = "cpu"
    code = CHILD.format(tests=str(ROOT / "tests"), autoaugment=autoaugment)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("autoaugment", [True])  # False: the same without the policy
def test_sharded_epoch_matches_single_device(autoaugment):
    out = run_child(autoaugment)
    loss_single, loss_sharded = out["loss"]
    assert loss_sharded == pytest.approx(loss_single, rel=1e-5, abs=1e-6)
    assert out["max_rel_diff"] < 1e-5
    assert out["n_leaves"] > 20
    assert out["moved"] > 1e-3  # the steps did train, so equal params mean something
    assert out["kernel_devices"] == 8  # the state really is replicated over the mesh
    assert out["batch_spec_ok"]


MESH_CHILD = textwrap.dedent(
    """
    import json, sys
    import jax
    sys.path.insert(0, {tests!r})
    from configs.tiny import get_config
    from micronet_jax.config.validate import check_batch_sizes
    from micronet_jax.distributed import sharding
    from micronet_jax.errors import ConfigError

    mesh = sharding.make_mesh()
    config = get_config()  # 4 ghost-BN splits: every batch a multiple of 4 x 8 devices
    outcome = {{"axes": list(mesh.axis_names), "size": mesh.size}}
    for size in (32, 48):
        config.train.batch_size = size
        try:
            check_batch_sizes(config)
            outcome[str(size)] = "accepted"
        except ConfigError as error:
            outcome[str(size)] = str(error)
    print(json.dumps(outcome))
    """
)


def test_the_mesh_spans_every_device_and_a_batch_must_split_over_them():
    """With 8 simulated devices: a 'data' mesh over all 8, and a batch size that does not
    give every device whole ghost-BN splits is refused before anything compiles."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags("--xla_force_host_platform_device_count=8")
    env["JAX_PLATFORMS"] = "cpu"
    code = MESH_CHILD.format(tests=str(ROOT / "tests"))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["axes"] == ["data"] and out["size"] == 8
    assert out["32"] == "accepted"
    refusal = "train.batch_size=48 must be a multiple of model.bn_splits (4) x devices (8)"
    assert refusal in out["48"]
