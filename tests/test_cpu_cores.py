"""Eval split over one CPU device per core gives what one device gives, and really splits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiny_run import with_fast_compile

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import json
    import jax, numpy as np
    from micronet_jax.backend import use_cpu_cores
    assert use_cpu_cores(3) == 3  # before any JAX operation
    from micronet_jax.evaluation.early_exit import (
        exit_confidence,
        exit_predict_fast,
        select_predictions,
    )
    from micronet_jax.models.architecture import build_architecture
    from micronet_jax.models.efficientnet import MicroNet, init_variables
    from micronet_jax.models.microbatch import map_micro_batches
    from micronet_jax.data.augment import eval_transform
    from micronet_jax.train.steps import predict_jit, predict

    arch = build_architecture(
        ("r1_k3_s1_e1_i8_o8_se0.25", "r1_k3_s2_e2_i8_o16_se0.25", "r1_k3_s1_e2_i16_o16_se0.25"),
        width=1.0, resolution=1.0, head_filters=32, num_classes=10, exit_block=1,
    )
    model = MicroNet(arch)
    variables = init_variables(model, jax.random.key(0))
    images = np.random.default_rng(0).integers(0, 256, (60, 32, 32, 3), dtype=np.uint8)

    main, exits = predict(model.apply, variables, images, batch_size=30)  # 10 per device
    one = jax.jit(lambda x: map_micro_batches(
        lambda b: model.apply(variables, eval_transform(b)), x, 16))
    ref_main, ref_exits = (np.asarray(a) for a in one(jax.device_put(images, jax.devices()[0])))
    split = predict_jit(model.apply, variables, images[:30])[0]
    uneven = predict_jit(model.apply, variables, images[:31])[0]  # 31 does not divide by 3

    confidence = np.asarray(exit_confidence(exits))
    threshold = float(np.median(confidence))
    fast = exit_predict_fast(model, variables, images, threshold, batch_size=30)
    exact = select_predictions(main, exits, threshold)
    print(json.dumps(dict(
        devices=jax.device_count(),
        main_diff=float(np.abs(main - ref_main).max()),
        exit_diff=float(np.abs(exits - ref_exits).max()),
        split_devices=len(split.sharding.device_set),
        uneven_devices=len(uneven.sharding.device_set),
        fast_equal=bool(np.array_equal(fast.predictions, exact.predictions)),
        exited=int(fast.exited.sum()),
        exited_equal=bool(np.array_equal(fast.exited, exact.exited)),
    )))
    """
)


@pytest.fixture(scope="module")
def child() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = with_fast_compile("")  # no simulated device count: one device per core
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_split_eval_equals_one_device(child):
    assert child["devices"] == 3
    assert child["main_diff"] < 1e-5 and child["exit_diff"] < 1e-5


@pytest.mark.slow
def test_batches_really_are_split_when_they_divide(child):
    assert child["split_devices"] == 3
    assert child["uneven_devices"] == 1


@pytest.mark.slow
def test_fast_exit_per_core_matches_the_exact_rule(child):
    assert child["fast_equal"] and child["exited_equal"]
    assert 0 < child["exited"] < 60  # some samples exit and some continue


def test_cpu_devices_must_be_a_count():
    from micronet_jax.backend import use_cpu_cores
    from micronet_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="cpu_devices"):
        use_cpu_cores(-1)


@pytest.mark.slow
def test_main_reads_cpu_devices():
    """The command line hands config.cpu_devices to use_cpu_cores before anything runs."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "micronet_jax.main",
            "--config=configs/test.py",
            "--config.cpu_devices=-1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "cpu_devices must be an int >= 0" in proc.stderr
