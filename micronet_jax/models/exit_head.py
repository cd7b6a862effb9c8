"""The early-exit head: a cheap classifier on an intermediate block's output."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from micronet_jax.models.architecture import ExitHeadSpec
from micronet_jax.models.layers import Conv2d, Dense, GhostBatchNorm, swish


class ExitHead(nn.Module):
    """Depthwise 3x3 -> BN -> swish -> 1x1 conv -> BN -> swish -> global pool -> dense."""

    spec: ExitHeadSpec
    num_classes: int
    padding: tuple[int, int]
    bn_splits: int = 4
    dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        spec = self.spec
        bn = dict(splits=self.bn_splits, dtype=self.dtype)
        conv = dict(dtype=self.dtype, impl=self.impl)
        h = Conv2d(
            spec.input_filters,
            spec.kernel_size,
            1,
            self.padding,
            groups=spec.input_filters,
            name="depthwise_conv",
            **conv,
        )(x)
        h = swish(GhostBatchNorm(name="bn0", **bn)(h, train))
        h = Conv2d(spec.head_filters, name="expand_conv", **conv)(h)
        h = swish(GhostBatchNorm(name="bn1", **bn)(h, train))
        h = jnp.mean(h, axis=(1, 2))
        return Dense(self.num_classes, dtype=self.dtype, name="fc")(h)
