"""Early-exit inference: the fast (tail on continuing samples only) path predicts exactly
what the exact one does."""

from __future__ import annotations

import pickle
import tarfile

import jax
import numpy as np
import pytest

from micronet_jax.errors import ConfigError
from micronet_jax.evaluation.early_exit import (
    exit_metrics,
    exit_predict_exact,
    exit_predict_fast,
    select_predictions,
    tail_chunk_size,
)
from micronet_jax.models.architecture import build_architecture
from micronet_jax.models.efficientnet import MicroNet, init_variables
from micronet_jax.models.microbatch import CPU_MICRO_BATCH

TINY_BLOCKS = (
    "r1_k3_s1_e1_i8_o8_se0.25",
    "r1_k3_s2_e2_i8_o16_se0.25",
    "r1_k3_s1_e2_i16_o16_se0.25",
)


def test_threshold_rule_is_strict():
    exit_logits = np.log(np.array([[0.85, 0.15], [0.9, 0.1], [0.5, 0.5]]))
    main_logits = np.array([[0.0, 1.0]] * 3)
    result = select_predictions(main_logits, exit_logits, 0.85)
    np.testing.assert_array_equal(result.exited, [False, True, False])
    np.testing.assert_array_equal(result.predictions, [1, 0, 1])
    metrics = exit_metrics(result, np.array([1, 0, 0]))
    assert metrics["exit_ratio"] == pytest.approx(1 / 3)
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["accuracy_of_exited"] == 1.0


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.1, 1.5])
def test_threshold_out_of_range(threshold):
    with pytest.raises(ConfigError, match=r"\(0, 1\)"):
        select_predictions(np.zeros((1, 2)), np.zeros((1, 2)), threshold)


def test_tail_chunk_fits_the_batch():
    # a single CPU device here: the tail runs in cache-sized micro-batches
    assert tail_chunk_size(512) == CPU_MICRO_BATCH
    assert tail_chunk_size(5) == 5  # a batch smaller than a micro-batch is one chunk


def _tiny_model():
    arch = build_architecture(
        TINY_BLOCKS, width=1.0, resolution=1.0, head_filters=32, num_classes=10, exit_block=1
    )
    model = MicroNet(arch)
    return model, init_variables(model, jax.random.key(0))


@pytest.mark.slow
def test_fast_equals_exact_on_a_random_model():
    model, variables = _tiny_model()
    images = np.random.default_rng(0).integers(0, 256, (100, 32, 32, 3), dtype=np.uint8)
    # pick a threshold between the exit confidences so that some samples exit and some don't
    exact_all = exit_predict_exact(model, variables, images, 0.5, batch_size=64)
    _, exit_logits = model.apply(variables, (images / 255.0).astype(np.float32))
    conf = np.sort(np.asarray(jax.nn.softmax(exit_logits).max(-1)))
    threshold = float(conf[len(conf) // 3])
    exact = exit_predict_exact(model, variables, images, threshold, batch_size=64)
    fast = exit_predict_fast(model, variables, images, threshold, batch_size=64)
    assert 0 < exact.exit_ratio < 1
    np.testing.assert_array_equal(fast.exited, exact.exited)
    np.testing.assert_array_equal(fast.predictions, exact.predictions)
    assert exact_all.predictions.shape == (100,)
    # chunks that do not divide the batch: the last one is clamped back and covers exited
    # samples and repeats continuing ones, which must not change any prediction
    for chunk in (1, 24, 64):
        odd = exit_predict_fast(model, variables, images, threshold, batch_size=64, chunk=chunk)
        np.testing.assert_array_equal(odd.predictions, exact.predictions)
    # every sample exits: no tail at all
    everyone = exit_predict_fast(model, variables, images, 1e-6, batch_size=64)
    assert everyone.exit_ratio == 1.0
    np.testing.assert_array_equal(everyone.predictions, np.asarray(exit_logits).argmax(-1))


def _cifar10_test_images(archive, n):
    with tarfile.open(archive) as tar:
        batch = pickle.load(tar.extractfile("cifar-10-batches-py/test_batch"), encoding="bytes")
    rows = batch[b"data"][:n]
    return rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


@pytest.mark.slow
@pytest.mark.shared
def test_fast_equals_exact_on_the_original_checkpoint(original_checkpoints, cifar10_archive):
    from micronet_jax.models.torch_import import load_original

    ckpt = load_original(original_checkpoints / "first_submission" / "trained_model.pth")
    images = _cifar10_test_images(cifar10_archive, 600)
    # CIFAR-10 is out of domain for this model: a low threshold makes a fair share exit
    exact = exit_predict_exact(ckpt.model, ckpt.variables, images, 0.3, batch_size=200)
    fast = exit_predict_fast(ckpt.model, ckpt.variables, images, 0.3, batch_size=200)
    assert 0 < exact.exit_ratio < 1
    np.testing.assert_array_equal(fast.exited, exact.exited)
    np.testing.assert_array_equal(fast.predictions, exact.predictions)
