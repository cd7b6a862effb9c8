"""Eval-mode micro-batching gives the same outputs as one pass over the whole batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from micronet_jax.models.architecture import build_architecture
from micronet_jax.models.efficientnet import MicroNet, init_variables
from micronet_jax.models.microbatch import map_micro_batches


@pytest.mark.slow
@pytest.mark.parametrize("n", [5, 37])  # a padded last micro-batch; several of them
def test_micro_batches_match_the_whole_batch(n):
    """Padding the last micro-batch and splitting leave every sample's outputs unchanged."""
    arch = build_architecture(
        ("r1_k3_s1_e1_i8_o8_se0.25", "r1_k3_s2_e2_i8_o16_se0.25"),
        width=0.5,
        depth=0.5,
        resolution=1.0,
        num_classes=7,
        exit_block=0,
    )
    model = MicroNet(arch=arch)
    variables = init_variables(model, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (n, 32, 32, 3))

    def forward(batch):
        return model.apply(variables, batch)

    whole_main, whole_exit = forward(x)
    main, exit_logits = jax.jit(lambda x: map_micro_batches(forward, x, 8))(x)
    assert main.shape == whole_main.shape and exit_logits.shape == whole_exit.shape
    np.testing.assert_allclose(main, whole_main, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(exit_logits, whole_exit, rtol=1e-5, atol=1e-5)


def test_outputs_that_are_none_pass_through():
    out = map_micro_batches(lambda b: (jnp.sum(b, axis=1), None), jnp.ones((20, 3)), 8)
    np.testing.assert_array_equal(out[0], np.full(20, 3.0))
    assert out[1] is None
