"""The model against the original's published network: shapes, counts, padding, BN, init."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from micronet_jax.models.architecture import (
    BlockSpec,
    build_architecture,
    conv_padding,
    decode_block_string,
    round_filters,
    round_repeats,
    same_padding,
    scaled_image_size,
)
from micronet_jax.models.conv import conv2d, resolve_impl
from micronet_jax.models.efficientnet import MBConv, MicroNet, create_model, init_variables
from micronet_jax.models.layers import (
    Conv2d,
    Dense,
    GhostBatchNorm,
    drop_connect,
    swish,
    upsample_nearest,
)

# The published block table: (s, e, in, mid, out, r, skip, drop-connect p, size in, size out).
PUBLISHED_TABLE = [
    (1, 1, 24, 24, 16, 4, False, 0.0, 31, 31),
    (1, 6, 16, 96, 24, 3, False, 0.0, 31, 31),
    (2, 6, 24, 144, 40, 4, False, 0.0, 31, 15),
    (1, 6, 40, 240, 40, 8, True, 0.06, 15, 15),
    (1, 6, 40, 240, 48, 8, False, 0.0, 15, 15),
    (1, 6, 48, 288, 64, 9, False, 0.0, 15, 15),
    (1, 6, 64, 384, 64, 12, True, 0.12, 15, 15),
    (2, 6, 64, 384, 80, 12, False, 0.0, 15, 7),
    (1, 6, 80, 480, 80, 16, True, 0.16, 7, 7),
    (1, 6, 80, 480, 96, 16, False, 0.0, 7, 7),
]

# A tiny network for real forward passes: 16-pixel input upsampled to 24 (1.2² = 1.44).
TINY_BLOCKS = ("r1_k3_s2_e1_i8_o16_se0.25", "r1_k5_s1_e2_i16_o16_se0.25")


def tiny_arch(exit_block: int | None = 0):
    return build_architecture(
        TINY_BLOCKS,
        width=1.0,
        resolution=1.2,
        head_filters=16,
        num_classes=10,
        input_size=16,
        exit_block=exit_block,
    )


# Keys for model inits: the RBG generator compiles much faster than threefry on CPU.
def init_key(seed: int) -> jax.Array:
    return jax.random.key(seed, impl="rbg")


@pytest.fixture(scope="module")
def tiny():
    """A tiny model with an exit head after block 0, its variables and an input batch."""
    model = create_model(tiny_arch(), conv_impl="fast")
    variables = init_variables(model, init_key(0))
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    return model, variables, x


@pytest.fixture(scope="module")
def tiny_logits(tiny):
    """The tiny model's jitted eval outputs with the 'fast' lowering."""
    model, variables, x = tiny
    return jax.jit(model.apply)(variables, x)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def shape_tree(model, batch: int = 4):
    return jax.eval_shape(lambda k: init_variables(model, k, batch), jax.random.key(0))


def block_output_shapes(model, variables, batch: int = 4) -> dict:
    """Every block's real output shape, by tracing the model (no compute)."""
    size = model.arch.input_size
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    _, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]),
        variables,
        x,
    )
    inter = state["intermediates"]
    return {k: v["__call__"][0].shape for k, v in inter.items() if k.startswith("blocks_")}


def is_bn(path) -> bool:
    names = [getattr(k, "key", "") for k in path]
    return any(n.startswith("bn") or n.endswith("_bn") for n in names)


# --------------------------------------------------------------------- architecture


def test_default_architecture_matches_spec_table():
    """Channels, strides, SE widths, skips, drop-connect rates and sizes: the published table."""
    arch = build_architecture()
    assert arch.input_size == 32
    assert arch.image_size == 63
    assert arch.stem_filters == 24
    assert arch.stem_size == 31
    assert arch.head_filters == 136
    assert arch.num_classes == 100
    assert arch.dropout_rate == pytest.approx(0.2)
    assert arch.final_size == 7
    assert arch.exit_head is None
    assert len(arch.blocks) == len(PUBLISHED_TABLE)
    for i, (block, row) in enumerate(zip(arch.blocks, PUBLISHED_TABLE, strict=True)):
        s, e, cin, mid, cout, r, skip, p, size_in, size_out = row
        assert block.index == i
        assert block.kernel_size == 3
        assert (block.stride, block.expand_ratio) == (s, e), i
        assert (block.input_filters, block.mid_filters, block.output_filters) == (cin, mid, cout)
        assert block.se_filters == r, i
        assert block.has_skip is skip, i
        assert block.has_expand is (e != 1)
        assert block.drop_connect_rate == pytest.approx(p, abs=1e-12), i
        assert (block.input_size, block.output_size) == (size_in, size_out), i


def test_default_exit_head_spec():
    """The exit head after block 4 reads 15×15×48 and has 136 head channels."""
    spec = build_architecture(exit_block=4).exit_head
    assert (spec.after_block, spec.input_filters, spec.head_filters) == (4, 48, 136)
    assert (spec.kernel_size, spec.size) == (3, 15)


@pytest.mark.parametrize(
    "channels, width, expected",
    [
        (24, 0.9, 24),  # 21.6 -> int(25.6)//8*8 = 24
        (16, 0.9, 16),  # 14.4 -> int(18.4)//8*8 = 16
        (56, 0.9, 48),  # 50.4 -> int(54.4)//8*8 = 48 (>= 45.36)
        (72, 0.9, 64),  # 64.8 -> 64
        (88, 0.9, 80),  # 79.2 -> 80
        (104, 0.9, 96),  # 93.6 -> 96
        (150, 0.9, 136),  # 135 -> int(139)//8*8 = 136
        (150, 1.0, 152),  # 150 -> int(154)//8*8 = 152
        (3, 1.0, 8),  # floor of 8
        (11, 1.0, 16),  # int(15)//8*8 = 8 < 9.9 -> + 8
        (27, 1.0, 32),  # int(31)//8*8 = 24 < 24.3 -> + 8
        (40, 2.0, 80),
    ],
)
def test_round_filters_hand_values(channels, width, expected):
    """EfficientNet rounding worked by hand."""
    assert round_filters(channels, width) == expected


def test_round_repeats_and_image_size():
    """Depth rounds up; the resolution coefficient is squared and rounded to 2 places."""
    assert round_repeats(2, 1.0) == 2
    assert round_repeats(1, 1.5) == 2
    assert round_repeats(3, 1.1) == 4  # ceil(3.3)
    assert scaled_image_size(32, 1.4) == 63  # ceil(32 * 1.96) = ceil(62.72)
    assert scaled_image_size(32, 1.0) == 32
    assert scaled_image_size(16, 1.2) == 24  # ceil(16 * 1.44) = ceil(23.04)


@pytest.mark.parametrize(
    "size, kernel, stride, expected",
    [
        (32, 3, 1, (1, 1)),
        (32, 3, 2, (0, 1)),
        (32, 1, 1, (0, 0)),
        (32, 5, 1, (2, 2)),
        (32, 5, 2, (1, 2)),
        (16, 3, 2, (0, 1)),
    ],
)
def test_same_padding(size, kernel, stride, expected):
    """TF 'same' padding for the reference size: total = (ceil(n/s)-1)·s + k - n."""
    assert same_padding(size, kernel, stride) == expected


def test_conv_padding_uses_reference_size():
    """Every conv pads for a 32-pixel input, so 63 -> 31 with (0, 1), not (1, 1)."""
    arch = build_architecture()
    assert conv_padding(arch, 3, 2) == (0, 1)
    assert conv_padding(arch, 3, 1) == (1, 1)
    assert conv_padding(arch, 1, 1) == (0, 0)


def test_width_and_resolution_one():
    """Width 1.0, resolution 1.0: unrounded channels, 32 -> 16 -> 8 -> 4, head 152."""
    arch = build_architecture(width=1.0, resolution=1.0)
    assert (arch.image_size, arch.stem_size, arch.stem_filters, arch.head_filters) == (
        32,
        16,
        24,
        152,
    )
    io = [(b.input_filters, b.output_filters) for b in arch.blocks]
    assert io == [
        (24, 16),
        (16, 24),
        (24, 40),
        (40, 40),
        (40, 56),
        (56, 72),
        (72, 72),
        (72, 88),
        (88, 88),
        (88, 104),
    ]
    sizes = [b.output_size for b in arch.blocks]
    assert sizes == [16, 16, 8, 8, 8, 8, 8, 4, 4, 4]
    model = create_model(arch)
    shapes = block_output_shapes(model, shape_tree(model))
    for b in arch.blocks:
        assert shapes[f"blocks_{b.index}"] == (4, b.output_size, b.output_size, b.output_filters)


def test_depth_two():
    """Depth 2.0 doubles every stage's repeats (20 blocks); repeats run at stride 1."""
    arch = build_architecture(depth=2.0)
    assert len(arch.blocks) == 20
    strides = [b.stride for b in arch.blocks]
    assert strides == [1, 1, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1, 1]
    for b in arch.blocks:
        expected_p = 0.2 * b.index / 20 if b.has_skip else 0.0
        assert b.drop_connect_rate == pytest.approx(expected_p)
    assert arch.blocks[1].has_skip  # repeat of block 0: 16 -> 16, stride 1
    model = create_model(arch)
    shapes = block_output_shapes(model, shape_tree(model))
    assert len(shapes) == 20
    for b in arch.blocks:
        assert shapes[f"blocks_{b.index}"] == (4, b.output_size, b.output_size, b.output_filters)


@pytest.mark.slow
def test_kernel5_block_string_builds_and_runs(tiny, tiny_logits):
    """A kernel-5 block pads (2, 2) and runs; the tiny model's forward has the right shapes."""
    model, variables, x = tiny
    arch = model.arch
    assert arch.image_size == 24 and arch.stem_size == 12
    assert [b.kernel_size for b in arch.blocks] == [3, 5]
    assert [b.output_size for b in arch.blocks] == [6, 6]
    assert [b.has_skip for b in arch.blocks] == [False, True]
    assert conv_padding(arch, 5, 1) == (2, 2)
    kernel = variables["params"]["blocks_1"]["depthwise_conv"]["kernel"]
    assert kernel.shape == (5, 5, 1, 32)
    shapes = block_output_shapes(model, variables)
    assert shapes == {"blocks_0": (4, 6, 6, 16), "blocks_1": (4, 6, 6, 16)}
    logits, exit_logits = tiny_logits
    assert logits.shape == (4, 10) and exit_logits.shape == (4, 10)
    assert np.all(np.isfinite(logits)) and np.all(np.isfinite(exit_logits))


def test_decode_block_string():
    """Fields decode; `noskip` turns the identity skip off."""
    b = decode_block_string("r2_k5_s2_e6_i24_o40_se0.25")
    assert (b.num_repeat, b.kernel_size, b.stride, b.expand_ratio) == (2, 5, 2, 6)
    assert (b.input_filters, b.output_filters, b.se_ratio, b.id_skip) == (24, 40, 0.25, True)
    assert decode_block_string("r1_k3_s1_e1_i16_o16_noskip").id_skip is False
    arch = build_architecture(["r1_k3_s1_e1_i16_o16_noskip"], width=1.0)
    assert not arch.blocks[0].has_skip and arch.blocks[0].se_filters == 0


@pytest.mark.parametrize(
    "text",
    [
        "",
        "r1_k3_s1_e1_i24",
        "r1_k3_s1_e1_i24_o16_se",
        "r1_k3_s1_e1_i24_o16_se0.2_X",
        "r1-k3",
        "r1_k3_s1_e1_i24_o16__se0.2",
    ],
)
def test_malformed_block_string(text):
    """Unparseable parts or missing fields raise ValueError."""
    with pytest.raises(ValueError):
        decode_block_string(text)
    with pytest.raises(ValueError):
        build_architecture([text])


def test_exit_block_out_of_range():
    """The exit head needs a block after it: valid range is 0..8 for 10 blocks."""
    arch = build_architecture()
    assert arch.with_exit_head(0).exit_head.after_block == 0
    assert arch.with_exit_head(8).exit_head.after_block == 8
    assert arch.with_exit_head(4).with_exit_head(None).exit_head is None
    for bad in (-1, 9, 10):
        with pytest.raises(ValueError):
            arch.with_exit_head(bad)
    with pytest.raises(ValueError):
        build_architecture(exit_block=9)


def test_resolve_impl():
    assert resolve_impl("xla") == "xla" and resolve_impl("fast") == "fast"
    assert resolve_impl("auto") in ("xla", "fast")
    with pytest.raises(ValueError):
        resolve_impl("cudnn")


# --------------------------------------------------------------------- parameter counts


def count_params(params):
    weights = biases = bn = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        size = math.prod(leaf.shape)
        if is_bn(path):
            bn += size
        elif len(leaf.shape) > 1:
            weights += size
        else:
            assert getattr(path[-1], "key", None) == "bias", path
            biases += size
    return weights, biases, bn


def test_parameter_counts():
    """467,824 weights + 2,952 biases = 470,776; exit head 20,660."""
    model = create_model(build_architecture(exit_block=4))
    params = dict(shape_tree(model)["params"])
    head = params.pop("exit_head")
    weights, biases, bn = count_params(params)
    assert weights == 467_824
    assert biases == 2_952
    assert weights + biases == 470_776
    assert bn > 0
    hw, hb, _ = count_params(head)
    assert hw == 432 + 6_528 + 13_600
    assert hb == 100
    assert hw + hb == 20_660
    shapes = {
        "/".join(k.key for k in p): leaf.shape
        for p, leaf in jax.tree_util.tree_leaves_with_path(head)
        if not is_bn(p)
    }
    assert shapes == {
        "depthwise_conv/kernel": (3, 3, 1, 48),
        "expand_conv/kernel": (1, 1, 48, 136),
        "fc/kernel": (136, 100),
        "fc/bias": (100,),
    }


@pytest.mark.slow
def test_default_model_shapes():
    """Block outputs follow the table's sizes; trunk ends at 15×15×48; logits (N, 100)."""
    model = create_model(build_architecture(exit_block=4))
    variables = shape_tree(model)
    shapes = block_output_shapes(model, variables)
    for i, row in enumerate(PUBLISHED_TABLE):
        assert shapes[f"blocks_{i}"] == (4, row[9], row[9], row[4])
    x = jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.float32)
    trunk = jax.eval_shape(lambda v, x: model.apply(v, x, method=MicroNet.trunk), variables, x)
    assert trunk.shape == (4, 15, 15, 48)
    logits, exit_logits = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
    assert logits.shape == (4, 100) and exit_logits.shape == (4, 100)


# --------------------------------------------------------------------- padding semantics


def numpy_conv(x, w, stride, pad, groups=1):
    """Direct NHWC / HWIO convolution with explicit (before, after) padding."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), pad, pad, (0, 0)))
    w = np.asarray(w, np.float64)
    k, _, cin_g, cout = w.shape
    n, hp, wp, cin = x.shape
    ho, wo = (hp - k) // stride + 1, (wp - k) // stride + 1
    out = np.zeros((n, ho, wo, cout))
    cout_g = cout // groups
    for o in range(cout):
        g = o // cout_g
        xs = x[..., g * cin_g : (g + 1) * cin_g]
        for a in range(k):
            for b in range(k):
                rows = slice(a, a + stride * (ho - 1) + 1, stride)
                cols = slice(b, b + stride * (wo - 1) + 1, stride)
                patch = xs[:, rows, cols]
                out[..., o] += patch @ w[a, b, :, o]
    return out


@pytest.fixture(scope="module")
def stem_case():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 63, 63, 3)).astype(np.float32)
    w = rng.standard_normal((3, 3, 3, 5)).astype(np.float32)
    return x, w


@pytest.mark.parametrize("impl", ["fast", "xla"])
def test_stride2_padding_63_to_31(stem_case, impl):
    """Stride-2 3×3 conv pads 0 before / 1 after: 63 -> 31, output (i, j) reads rows 2i..2i+2."""
    x, w = stem_case
    y = np.asarray(conv2d(jnp.asarray(x), jnp.asarray(w), 2, (0, 1), impl=impl))
    assert y.shape == (2, 31, 31, 5)
    expected = numpy_conv(x, w, 2, (0, 1))
    assert rel_err(y, expected) < 1e-5
    # The last output row reads input rows 60, 61, 62 (no padding used), first reads 0, 1, 2.
    manual = np.einsum("nabc,abco->no", x[:, 60:63, 0:3].astype(np.float64), w)
    np.testing.assert_allclose(y[:, 30, 0], manual, rtol=1e-5, atol=1e-5)
    # Symmetric (1, 1) padding would give another answer: the test tells them apart.
    assert rel_err(expected, numpy_conv(x, w, 2, (1, 1))[:, :31, :31]) > 0.1


@pytest.mark.parametrize("impl", ["fast", "xla"])
def test_depthwise_stride2_padding(impl):
    """Depthwise 3×3 stride 2 with (0, 1) on 15 -> 7 matches the direct convolution."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 15, 15, 6)).astype(np.float32)
    w = rng.standard_normal((3, 3, 1, 6)).astype(np.float32)
    y = conv2d(jnp.asarray(x), jnp.asarray(w), 2, (0, 1), groups=6, impl=impl)
    assert y.shape == (2, 7, 7, 6)
    assert rel_err(y, numpy_conv(x, w, 2, (0, 1), groups=6)) < 1e-5


def test_stride2_padding_against_torch(stem_case):
    """The same conv as PyTorch: F.pad(left 0, right 1, top 0, bottom 1) then F.conv2d."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, w = stem_case
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    wt = torch.from_numpy(w).permute(3, 2, 0, 1)  # HWIO -> OIHW
    ref = F.conv2d(F.pad(xt, (0, 1, 0, 1)), wt, stride=2).permute(0, 2, 3, 1).numpy()
    for impl in ("fast", "xla"):
        y = conv2d(jnp.asarray(x), jnp.asarray(w), 2, (0, 1), impl=impl)
        assert rel_err(y, ref) < 1e-5


# --------------------------------------------------------------------- conv lowerings


CONV_CASES = {
    "depthwise_s1": ((2, 9, 9, 8), (3, 3, 1, 8), 1, (1, 1), 8),
    "depthwise_s2": ((2, 9, 9, 8), (3, 3, 1, 8), 2, (0, 1), 8),
    "pointwise": ((2, 7, 7, 8), (1, 1, 8, 12), 1, (0, 0), 1),
    "stem": ((2, 17, 17, 3), (3, 3, 3, 24), 2, (0, 1), 1),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_fast_lowering_matches_xla(case):
    """'fast' (shifted / matmul / im2col) equals XLA's conv: forward, d/dx and d/dkernel."""
    xs, ws, stride, pad, groups = CONV_CASES[case]
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal(xs), jnp.float32)
    w = jnp.asarray(rng.standard_normal(ws), jnp.float32)

    @jax.jit
    def both(x, w):
        outs, grads = {}, {}
        for impl in ("fast", "xla"):
            f = lambda x, w, impl=impl: conv2d(x, w, stride, pad, groups, impl)
            y, vjp = jax.vjp(f, x, w)
            ct = jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape)
            outs[impl], grads[impl] = y, vjp(ct)
        return outs, grads

    outs, grads = both(x, w)
    # The 'fast' form really is another lowering (no native conv in its forward or backward).
    fast_grad = jax.grad(lambda x, w: conv2d(x, w, stride, pad, groups, "fast").sum(), (0, 1))
    assert "conv_general_dilated" not in str(jax.make_jaxpr(fast_grad)(x, w))
    xla_fwd = lambda x, w: conv2d(x, w, stride, pad, groups, "xla")
    assert "conv_general_dilated" in str(jax.make_jaxpr(xla_fwd)(x, w))
    assert outs["fast"].shape == outs["xla"].shape
    assert rel_err(outs["fast"], outs["xla"]) <= 1e-5
    for gf, gx in zip(grads["fast"], grads["xla"], strict=True):
        assert rel_err(gf, gx) <= 1e-5
    expected = numpy_conv(np.asarray(x), np.asarray(w), stride, pad, groups)
    assert rel_err(outs["fast"], expected) <= 1e-5


def test_whole_model_fast_matches_xla(tiny, tiny_logits):
    """The tiny model gives the same logits with either lowering (eval mode)."""
    model, variables, x = tiny
    xla = jax.jit(create_model(model.arch, conv_impl="xla").apply)(variables, x)
    for a, b in zip(tiny_logits, xla, strict=True):
        assert rel_err(a, b) <= 1e-5


# --------------------------------------------------------------------- upsample


def test_upsample_nearest_index_rule():
    """Output i reads input floor(i·32/63): every pixel twice, first 63 kept."""
    x = np.arange(2 * 32 * 32 * 2, dtype=np.float32).reshape(2, 32, 32, 2)
    y = np.asarray(upsample_nearest(jnp.asarray(x), 63))
    assert y.shape == (2, 63, 63, 2)
    for i in (0, 1, 2, 31, 32, 33, 61, 62):
        for j in (0, 1, 31, 62):
            assert np.array_equal(y[:, i, j], x[:, i * 32 // 63, j * 32 // 63])
    doubled = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)[:, :63, :63]
    assert np.array_equal(y, doubled)
    assert upsample_nearest(jnp.asarray(x), 32).shape == x.shape


def test_upsample_nearest_against_torch():
    """Same pixels as torch.nn.functional.interpolate(mode='nearest')."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(2).standard_normal((2, 32, 32, 3)).astype(np.float32)
    ref = (
        torch.nn.functional.interpolate(
            torch.from_numpy(x).permute(0, 3, 1, 2), size=(63, 63), mode="nearest"
        )
        .permute(0, 2, 3, 1)
        .numpy()
    )
    assert np.array_equal(np.asarray(upsample_nearest(jnp.asarray(x), 63)), ref)


# --------------------------------------------------------------------- ghost batch norm


@pytest.fixture(scope="module")
def gbn_case():
    """A batch of 8 with per-sample offsets, random scale/bias and non-default running stats."""
    rng = np.random.default_rng(4)
    c = 3
    x = rng.standard_normal((8, 3, 3, c)) * rng.uniform(0.5, 2, (8, 1, 1, 1))
    x = (x + rng.standard_normal((8, 1, 1, c)) * 2).astype(np.float32)
    variables = {
        "params": {
            "scale": rng.uniform(0.5, 1.5, c).astype(np.float32),
            "bias": rng.standard_normal(c).astype(np.float32),
        },
        "batch_stats": {
            "mean": rng.standard_normal(c).astype(np.float32),
            "var": rng.uniform(0.5, 2, c).astype(np.float32),
        },
    }
    return x, variables


def ghost_bn_numpy(x, scale, bias, eps=1e-5, groups=None):
    """Ghost batch g = samples n with n mod 4 == g; biased variance; also the running targets."""
    x = np.asarray(x, np.float64)
    if groups is None:
        groups = [np.arange(g, len(x), 4) for g in range(4)]
    y = np.empty_like(x)
    means, unbiased = [], []
    for idx in groups:
        xs = x[idx]
        mean = xs.mean(axis=(0, 1, 2))
        var = ((xs - mean) ** 2).mean(axis=(0, 1, 2))
        count = xs.shape[0] * xs.shape[1] * xs.shape[2]
        y[idx] = (xs - mean) / np.sqrt(var + eps) * scale + bias
        means.append(mean)
        unbiased.append(var * count / (count - 1))
    return y, np.mean(means, axis=0), np.mean(unbiased, axis=0)


def test_ghost_bn_training(gbn_case):
    """Sample n is normalised by ghost batch n mod 4; running stats move 10% to the targets."""
    x, variables = gbn_case
    bn = GhostBatchNorm(splits=4)
    y, updates = bn.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    p, s = variables["params"], variables["batch_stats"]
    ref, mean_target, var_target = ghost_bn_numpy(x, p["scale"], p["bias"])
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    stats = updates["batch_stats"]
    np.testing.assert_allclose(stats["mean"], 0.9 * s["mean"] + 0.1 * mean_target, rtol=1e-5)
    np.testing.assert_allclose(stats["var"], 0.9 * s["var"] + 0.1 * var_target, rtol=1e-5)
    # Contiguous ghost batches (samples 0-1, 2-3, ...) would give another answer.
    contiguous = [np.arange(2 * g, 2 * g + 2) for g in range(4)]
    other = ghost_bn_numpy(x, p["scale"], p["bias"], groups=contiguous)[0]
    assert np.max(np.abs(other - ref)) > 1e-2


def test_ghost_bn_eval_and_errors(gbn_case):
    """Eval normalises with the running statistics; a batch not divisible by 4 is refused."""
    x, variables = gbn_case
    bn = GhostBatchNorm(splits=4)
    y = bn.apply(variables, jnp.asarray(x), train=False)
    p, s = variables["params"], variables["batch_stats"]
    ref = (x.astype(np.float64) - s["mean"]) / np.sqrt(s["var"] + 1e-5) * p["scale"] + p["bias"]
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        bn.apply(variables, jnp.asarray(x[:6]), train=True, mutable=["batch_stats"])
    assert bn.apply(variables, jnp.asarray(x[:6]), train=False).shape == (6, 3, 3, 3)


def test_ghost_bn_against_torch(gbn_case):
    """The original's way: N×C×H×W viewed as (N/4)×(4C)×H×W through BatchNorm2d(4C)."""
    torch = pytest.importorskip("torch")
    x, variables = gbn_case
    p, s = variables["params"], variables["batch_stats"]
    n, c = x.shape[0], x.shape[-1]
    tbn = torch.nn.BatchNorm2d(4 * c, eps=1e-5, momentum=0.1).double()
    with torch.no_grad():
        tbn.weight.copy_(torch.from_numpy(np.tile(p["scale"], 4).astype(np.float64)))
        tbn.bias.copy_(torch.from_numpy(np.tile(p["bias"], 4).astype(np.float64)))
        tbn.running_mean.copy_(torch.from_numpy(np.tile(s["mean"], 4).astype(np.float64)))
        tbn.running_var.copy_(torch.from_numpy(np.tile(s["var"], 4).astype(np.float64)))
    xt = torch.from_numpy(x.astype(np.float64)).permute(0, 3, 1, 2).contiguous()  # NCHW
    tbn.train()
    yt = tbn(xt.view(n // 4, 4 * c, 3, 3)).view(n, c, 3, 3).permute(0, 2, 3, 1).detach().numpy()
    bn = GhostBatchNorm(splits=4)
    y, updates = bn.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y), yt, rtol=1e-5, atol=1e-5)
    stats = updates["batch_stats"]
    rm = tbn.running_mean.view(4, c).mean(0).numpy()
    rv = tbn.running_var.view(4, c).mean(0).numpy()
    np.testing.assert_allclose(stats["mean"], rm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"], rv, rtol=1e-5, atol=1e-6)
    # Eval, with the 4 sets of running statistics averaged as the original does.
    with torch.no_grad():
        tbn.running_mean.copy_(torch.from_numpy(np.tile(rm, 4)))
        tbn.running_var.copy_(torch.from_numpy(np.tile(rv, 4)))
    tbn.eval()
    ye = tbn(xt.view(n // 4, 4 * c, 3, 3)).view(n, c, 3, 3).permute(0, 2, 3, 1).detach().numpy()
    new_vars = {"params": p, "batch_stats": stats}
    np.testing.assert_allclose(
        np.asarray(bn.apply(new_vars, jnp.asarray(x), train=False)), ye, rtol=1e-5, atol=1e-5
    )


def ghost_bn_grads(x, variables, ct):
    """Gradients of Σ ct·GhostBN_train(x) w.r.t. x, scale and bias (the library's backward)."""
    bn = GhostBatchNorm(splits=4)

    def f(x, params):
        y, _ = bn.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.sum(y * ct)

    gx, gp = jax.jit(jax.grad(f, (0, 1)))(jnp.asarray(x), variables["params"])
    return np.asarray(gx), np.asarray(gp["scale"]), np.asarray(gp["bias"])


def test_ghost_bn_gradients_match_autodiff(gbn_case):
    """The BN backward equals autodiff of a plain interleaved ghost BN written here."""
    x, variables = gbn_case
    ct = jnp.asarray(np.random.default_rng(11).standard_normal(x.shape), jnp.float32)

    def plain(x, scale, bias):
        out = []
        for g in range(4):
            xs = x[g::4]
            mean = xs.mean(axis=(0, 1, 2))
            var = ((xs - mean) ** 2).mean(axis=(0, 1, 2))
            out.append((xs - mean) / jnp.sqrt(var + 1e-5) * scale + bias)
        y = jnp.stack(out, axis=1).reshape(x.shape)  # sample 4q + g back in place
        return jnp.sum(y * ct)

    p = variables["params"]
    ref = jax.jit(jax.grad(plain, (0, 1, 2)))(
        jnp.asarray(x), jnp.asarray(p["scale"]), jnp.asarray(p["bias"])
    )
    for got, want in zip(ghost_bn_grads(x, variables, ct), ref, strict=True):
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-5)


def test_ghost_bn_gradients_against_torch(gbn_case):
    """Same gradients as autograd through the original's view + BatchNorm2d(4C)."""
    torch = pytest.importorskip("torch")
    x, variables = gbn_case
    p = variables["params"]
    n, c = x.shape[0], x.shape[-1]
    ct = np.random.default_rng(12).standard_normal(x.shape)
    tbn = torch.nn.BatchNorm2d(4 * c, eps=1e-5).double().train()
    with torch.no_grad():
        tbn.weight.copy_(torch.from_numpy(np.tile(p["scale"], 4).astype(np.float64)))
        tbn.bias.copy_(torch.from_numpy(np.tile(p["bias"], 4).astype(np.float64)))
    xt = torch.from_numpy(x.astype(np.float64)).permute(0, 3, 1, 2).contiguous()
    xt.requires_grad_(True)
    y = tbn(xt.view(n // 4, 4 * c, 3, 3)).view(n, c, 3, 3).permute(0, 2, 3, 1)
    (y * torch.from_numpy(ct)).sum().backward()
    gx, gs, gb = ghost_bn_grads(x, variables, jnp.asarray(ct, jnp.float32))
    np.testing.assert_allclose(gx, xt.grad.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gs, tbn.weight.grad.view(4, c).sum(0).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gb, tbn.bias.grad.view(4, c).sum(0).numpy(), rtol=1e-4, atol=1e-5)


def test_swish_value_and_gradient():
    """swish(x) = x·σ(x); its gradient equals autodiff of that formula."""
    x = jnp.linspace(-8.0, 8.0, 33)
    np.testing.assert_allclose(
        np.asarray(swish(x)), np.asarray(x) / (1 + np.exp(-np.asarray(x))), rtol=1e-6, atol=1e-7
    )
    got = jax.grad(lambda x: jnp.sum(jnp.sin(x) * swish(x)))(x)
    want = jax.grad(lambda x: jnp.sum(jnp.sin(x) * x * jax.nn.sigmoid(x)))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------- drop-connect / dropout


def test_drop_connect_per_sample():
    """Each sample is all dropped or all kept and scaled by 1/(1-p); keep rate ≈ 1-p."""
    p = 0.25
    x = jnp.asarray(np.random.default_rng(5).uniform(1, 2, (400, 2, 2, 3)), jnp.float32)
    y = np.asarray(drop_connect(x, p, jax.random.key(6)))
    xn = np.asarray(x)
    dropped = np.all(y == 0, axis=(1, 2, 3))
    kept = ~dropped
    np.testing.assert_allclose(y[kept], xn[kept] / (1 - p), rtol=1e-6)
    assert np.all(np.any(y != 0, axis=(1, 2, 3)) == kept)  # never partly dropped
    # 400 draws at keep 0.75: mean 300, sd ≈ 8.7.
    assert 260 <= kept.sum() <= 340


@pytest.mark.slow
def test_mbconv_drop_connect_train_and_eval():
    """In training a skip block adds 0 or h/(1-p) per sample (h = bn2's output); eval adds h."""
    spec = BlockSpec(
        index=3,
        kernel_size=3,
        stride=1,
        expand_ratio=2,
        input_filters=8,
        output_filters=8,
        se_filters=2,
        has_skip=True,
        drop_connect_rate=0.5,
        input_size=5,
        output_size=5,
    )
    block = MBConv(spec, (1, 1))
    x = jnp.asarray(np.random.default_rng(7).standard_normal((16, 5, 5, 8)), jnp.float32)

    @jax.jit
    def run(x):
        variables = block.init({"params": init_key(8)}, x, train=False)
        kw = dict(capture_intermediates=lambda mdl, _: mdl.name == "bn2")
        train = block.apply(
            variables,
            x,
            train=True,
            rngs={"dropout": jax.random.key(9)},
            mutable=["batch_stats", "intermediates"],
            **kw,
        )
        ev = block.apply(variables, x, train=False, mutable=["intermediates"], **kw)
        return train, ev

    (out, state), (ev, ev_state) = run(x)
    h = np.asarray(state["intermediates"]["bn2"]["__call__"][0])
    delta = np.asarray(out) - np.asarray(x)
    n_kept = 0
    for i in range(16):
        if np.all(delta[i] == 0):
            continue
        np.testing.assert_allclose(delta[i], 2 * h[i], rtol=1e-5, atol=1e-5)
        n_kept += 1
    assert 0 < n_kept < 16
    # Eval: drop-connect is the identity (no 'dropout' rng was given).
    h_eval = np.asarray(ev_state["intermediates"]["bn2"]["__call__"][0])
    np.testing.assert_allclose(np.asarray(ev), np.asarray(x) + h_eval, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_dropout_inactive_in_eval(tiny):
    """Eval logits do not depend on the dropout rng; training logits do."""
    model, variables, x = tiny
    a = model.apply(variables, x, rngs={"dropout": jax.random.key(1)})[0]
    b = model.apply(variables, x, rngs={"dropout": jax.random.key(2)})[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    c = model.apply(variables, x)[0]
    assert np.array_equal(np.asarray(a), np.asarray(c))
    train = jax.jit(
        lambda k: model.apply(variables, x, True, rngs={"dropout": k}, mutable=["batch_stats"])[0][
            0
        ]
    )
    ta, tb = train(jax.random.key(1)), train(jax.random.key(2))
    assert not np.allclose(np.asarray(ta), np.asarray(tb))


# --------------------------------------------------------------------- initialisation


@pytest.mark.slow
def test_conv_init_uniform_bound():
    """A large conv kernel is U(±1/√fan_in): fan_in = in/groups·k·k, std ≈ bound/√3."""
    x = jnp.zeros((1, 4, 4, 64))
    for groups, features, fan_in in ((1, 256, 64 * 9), (64, 64, 9)):
        conv = Conv2d(features, 3, 1, (1, 1), groups=groups, use_bias=True)
        params = jax.jit(conv.init)(jax.random.key(groups), x)["params"]
        w, b = np.asarray(params["kernel"]), np.asarray(params["bias"])
        bound = 1 / math.sqrt(fan_in)
        assert np.max(np.abs(w)) <= bound and np.max(np.abs(b)) <= bound
        if w.size > 10_000:
            assert w.std() == pytest.approx(bound / math.sqrt(3), rel=0.1)
            assert abs(w.mean()) < 0.05 * bound
        assert np.max(np.abs(w)) > 0.9 * bound
    dense = jax.jit(Dense(50).init)(jax.random.key(0), jnp.zeros((1, 400)))["params"]
    assert np.max(np.abs(dense["kernel"])) <= 0.05  # 1/√400
    assert np.max(np.abs(dense["kernel"])) > 0.045


def test_model_init(tiny):
    """Every conv/dense weight within ±1/√fan_in, biases by their layer's fan_in; BN 1 and 0."""
    _, variables, _ = tiny
    params = variables["params"]
    flat = {
        tuple(k.key for k in p): np.asarray(v)
        for p, v in jax.tree_util.tree_leaves_with_path(params)
    }
    n_kernels = 0
    for path, leaf in flat.items():
        parent = path[:-1]
        if is_bn([jax.tree_util.DictKey(k) for k in path]):
            expected = 1.0 if path[-1] == "scale" else 0.0
            assert np.all(leaf == expected), path
            continue
        kernel = flat[parent + ("kernel",)]
        bound = 1 / math.sqrt(math.prod(kernel.shape[:-1]))  # HWIO or (in, out)
        assert np.max(np.abs(leaf)) <= bound + 1e-7, path
        if leaf.size >= 64:
            assert np.max(np.abs(leaf)) > 0.8 * bound, path
        n_kernels += path[-1] == "kernel"
    assert n_kernels > 10
    bs = variables["batch_stats"]
    for p, v in jax.tree_util.tree_leaves_with_path(bs):
        assert np.all(np.asarray(v) == (0.0 if p[-1].key == "mean" else 1.0))


# --------------------------------------------------------------------- eval-mode outputs


def test_outputs_without_exit_head():
    """Without an exit head `exit_logits` is None and there are no exit params."""
    model = create_model(tiny_arch(exit_block=None))
    variables = shape_tree(model)
    assert "exit_head" not in variables["params"]
    x = jax.ShapeDtypeStruct((4, 16, 16, 3), jnp.float32)
    logits, exit_logits = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
    assert logits.shape == (4, 10) and logits.dtype == jnp.float32
    assert exit_logits is None


@pytest.mark.slow
def test_trunk_exit_tail_compose(tiny):
    """trunk -> exit and trunk -> tail give exactly __call__'s outputs."""
    model, variables, x = tiny
    logits, exit_logits = model.apply(variables, x)
    feats = model.apply(variables, x, method=MicroNet.trunk)
    assert feats.shape == (4, 6, 6, 16)
    tail = model.apply(variables, feats, method=MicroNet.tail)
    ex = model.apply(variables, feats, method=MicroNet.exit)
    assert np.array_equal(np.asarray(tail), np.asarray(logits))
    assert np.array_equal(np.asarray(ex), np.asarray(exit_logits))
    # The tail on a subset of samples gives those samples' logits.
    sub = model.apply(variables, feats[jnp.asarray([3, 1])], method=MicroNet.tail)
    np.testing.assert_allclose(np.asarray(sub), np.asarray(logits)[[3, 1]], rtol=1e-6, atol=1e-6)
