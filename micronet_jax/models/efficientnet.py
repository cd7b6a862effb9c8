"""MicroNet: the original's scaled EfficientNet (MBConv + squeeze-excite + ghost BN).

Built from an `Architecture` (block args after compound scaling), never from a channel table.
Methods `trunk`, `exit` and `tail` split the forward pass at the early-exit block, so fast
exit inference can run the tail on the samples that did not exit only.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from micronet_jax.models.architecture import Architecture, BlockSpec, conv_padding
from micronet_jax.models.exit_head import ExitHead
from micronet_jax.models.layers import (
    Conv2d,
    Dense,
    GhostBatchNorm,
    drop_connect,
    squeeze_excite,
    swish,
    upsample_nearest,
)

Dtype = Any


class MBConv(nn.Module):
    """[1x1 expand, BN, swish], depthwise, BN, swish, SE, 1x1 project, BN (+ skip)."""

    spec: BlockSpec
    padding: tuple[int, int]
    bn_splits: int = 4
    dtype: Dtype = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        spec = self.spec
        bn = dict(splits=self.bn_splits, dtype=self.dtype)
        conv = dict(dtype=self.dtype, impl=self.impl)
        h = x
        if spec.has_expand:
            h = Conv2d(spec.mid_filters, name="expand_conv", **conv)(h)
            h = swish(GhostBatchNorm(name="bn0", **bn)(h, train))
        h = Conv2d(
            spec.mid_filters,
            spec.kernel_size,
            spec.stride,
            self.padding,
            groups=spec.mid_filters,
            name="depthwise_conv",
            **conv,
        )(h)
        h = swish(GhostBatchNorm(name="bn1", **bn)(h, train))
        if spec.se_filters:
            h = squeeze_excite(h, spec.se_filters, self.dtype, self.impl)
        h = Conv2d(spec.output_filters, name="project_conv", **conv)(h)
        h = GhostBatchNorm(name="bn2", **bn)(h, train)
        if spec.has_skip:
            if train and spec.drop_connect_rate > 0:
                h = drop_connect(h, spec.drop_connect_rate, self.make_rng("dropout"))
            h = h + x
        return h


class MicroNet(nn.Module):
    """The OSI AI MicroNet; input is a normalised (N, 32, 32, 3) batch.

    `__call__` returns `(logits, exit_logits)`; `exit_logits` is None without an exit head.
    """

    arch: Architecture
    bn_splits: int = 4
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"
    upsample: str = "gather"  # layers.upsample_nearest's `how` (the same values either way)

    def setup(self) -> None:
        arch = self.arch
        bn = dict(splits=self.bn_splits, dtype=self.dtype)
        conv = dict(dtype=self.dtype, impl=self.conv_impl)
        self.stem_conv = Conv2d(arch.stem_filters, 3, 2, conv_padding(arch, 3, 2), **conv)
        self.stem_bn = GhostBatchNorm(**bn)
        self.blocks = [
            MBConv(
                spec,
                conv_padding(arch, spec.kernel_size, spec.stride),
                self.bn_splits,
                self.dtype,
                self.conv_impl,
            )
            for spec in arch.blocks
        ]
        self.head_conv = Conv2d(arch.head_filters, **conv)
        self.head_bn = GhostBatchNorm(**bn)
        self.dropout = nn.Dropout(arch.dropout_rate)
        self.fc = Dense(arch.num_classes, dtype=self.dtype)
        if arch.exit_head is not None:
            self.exit_head = ExitHead(
                arch.exit_head,
                arch.num_classes,
                conv_padding(arch, arch.exit_head.kernel_size, 1),
                self.bn_splits,
                self.dtype,
                self.conv_impl,
            )

    @property
    def split_block(self) -> int:
        """Index of the last block run by `trunk` (the exit block, or the last block)."""
        exit_head = self.arch.exit_head
        return exit_head.after_block if exit_head is not None else len(self.arch.blocks) - 1

    def stem(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Upsample, stem conv, BN, swish."""
        x = upsample_nearest(x.astype(self.dtype), self.arch.image_size, self.upsample)
        return swish(self.stem_bn(self.stem_conv(x), train))

    def block(self, h: jax.Array, index: int, train: bool = False) -> jax.Array:
        return self.blocks[index](h, train)

    def head(self, h: jax.Array, train: bool = False) -> jax.Array:
        """Head conv, BN, swish, pool, dropout and classifier."""
        h = swish(self.head_bn(self.head_conv(h), train))
        h = jnp.mean(h, axis=(1, 2))
        h = self.dropout(h, deterministic=not train)
        return self.fc(h).astype(jnp.float32)

    def trunk(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Upsample, stem and blocks up to and including the exit block."""
        h = self.stem(x, train)
        for index in range(self.split_block + 1):
            h = self.block(h, index, train)
        return h

    def tail(self, features: jax.Array, train: bool = False) -> jax.Array:
        """The remaining blocks, head, pool, dropout and classifier."""
        h = features
        for index in range(self.split_block + 1, len(self.arch.blocks)):
            h = self.block(h, index, train)
        return self.head(h, train)

    def exit(self, features: jax.Array, train: bool = False) -> jax.Array:
        """Exit-head logits from the exit block's output."""
        return self.exit_head(features, train).astype(jnp.float32)

    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array | None]:
        features = self.trunk(x, train)
        exit_logits = self.exit(features, train) if self.arch.exit_head is not None else None
        return self.tail(features, train), exit_logits


@dataclasses.dataclass(frozen=True)
class Segment:
    """One piece of the forward pass, in running order: `run(module, x, train)` maps the
    output of segment `source` ('image': the normalised input) to this one's; its conv and
    dense layers are those whose parameter paths start with one of `scopes`."""

    name: str
    source: str
    run: Callable[..., jax.Array]
    scopes: tuple[str, ...]


@functools.cache
def segments(arch: Architecture) -> tuple[Segment, ...]:
    """MicroNet's forward pass as segments: stem, every block (the exit head right after the
    exit block, reading its output), head. Segments after the first read the one before,
    except the block after the exit head, which reads the exit block's output too. Cached:
    the same segments (and their `run` functions) for the same architecture, so programs
    compiled for a segment are reused across quantisations of the network."""
    split = arch.exit_head.after_block if arch.exit_head is not None else None
    out = [Segment("stem", "image", MicroNet.stem, ("stem_conv/",))]
    for index in range(len(arch.blocks)):
        source = out[-1].name if out[-1].name != "exit_head" else f"blocks_{split}"
        run = functools.partial(_block, index=index)
        out.append(Segment(f"blocks_{index}", source, run, (f"blocks_{index}/",)))
        if index == split:
            out.append(Segment("exit_head", out[-1].name, MicroNet.exit, ("exit_head/",)))
    source = out[-1].name
    out.append(Segment("head", source, MicroNet.head, ("head_conv/", "fc/")))
    return tuple(out)


def _block(module: MicroNet, h: jax.Array, train: bool = False, *, index: int) -> jax.Array:
    return module.block(h, index, train)


def create_model(arch: Architecture, **kwargs: Any) -> MicroNet:
    """The model for `arch` (kwargs: bn_splits, dtype, conv_impl)."""
    return MicroNet(arch=arch, **kwargs)


def init_variables(model: MicroNet, key: jax.Array, batch_size: int = 4) -> dict:
    """Initialise params and batch_stats for a (batch_size, 32, 32, 3) input.

    Compiled: op by op, the CPU lowering's many small slices make the full model's init take
    tens of seconds; the values are the same (the random draws do not depend on jit).
    """
    size = model.arch.input_size
    x = jnp.zeros((batch_size, size, size, 3), jnp.float32)
    return dict(jax.jit(lambda k: model.init({"params": k}, x, train=False))(key))
