"""The MicroNet counter against the original's published numbers and the model."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from micronet_jax import score
from micronet_jax.errors import CheckpointError, ConfigError
from micronet_jax.models.architecture import build_architecture
from micronet_jax.quant.widths import BitWidths, parse_override
from micronet_jax.scoring.counter import (
    count_micronet,
    measured_sparsity,
    prunable_tensors,
)

REPO = Path(__file__).resolve().parents[1]
ARCH = build_architecture()
ARCH_EXIT4 = ARCH.with_exit_head(4)
MAIN_ROWS = ["stem"] + [f"block_{i}" for i in range(10)] + ["head", "pool", "fc"]

# (arch, options, param score, math score, total) as published.
PUBLISHED = {
    "dense": (ARCH, {}, 0.006449, 0.008328, 0.014777),
    "pruned 64%": (ARCH, {"sparsity": 0.64}, 0.002748, 0.003148, 0.005896),
    "exit head, r 0.3217": (
        ARCH_EXIT4,
        {"sparsity": 0.64, "exit_ratio": 0.3217},
        0.003031,
        0.002753,
        0.005784,
    ),
    "final ranking": (
        ARCH_EXIT4,
        {"sparsity": 0.64, "exit_ratio": 0.2929, "exit_sparsity": 0.5, "bn_as_bias": True},
        0.002995,
        0.002803,
        0.005798,
    ),
}


# --- published numbers ----------------------------------------------------------------------


def test_dense_totals_match_the_published_table():
    count = count_micronet(ARCH)
    assert [layer.name for layer in count.layers] == MAIN_ROWS
    assert count.params == 470_776
    assert count.mults == 60_456_692
    assert count.adds == 57_132_604
    assert count.math_ops == 117_589_296
    assert count.mask_bits == 0


def test_dense_weights_and_biases_split_as_in_spec():
    weights = sum(n for _, n in prunable_tensors(ARCH))
    assert weights == 467_824
    assert count_micronet(ARCH).params - weights == 2_952


@pytest.mark.parametrize("setting", PUBLISHED)
def test_published_scores(setting):
    arch, options, param_score, math_score, total = PUBLISHED[setting]
    count = count_micronet(arch, **options)
    assert round(count.param_score, 6) == param_score
    assert round(count.score, 6) == total
    if setting == "final ranking":
        assert abs(round(count.math_score, 6) - math_score) <= 1.0001e-6
    else:
        assert round(count.math_score, 6) == math_score


def test_final_ranking_is_exact_with_the_upsample_counted():
    arch, options, param_score, math_score, total = PUBLISHED["final ranking"]
    count = count_micronet(arch, include_upsample=True, **options)
    assert (round(count.param_score, 6), round(count.math_score, 6)) == (param_score, math_score)
    assert round(count.score, 6) == total


@pytest.mark.parametrize("setting", ["dense", "pruned 64%"])
def test_first_rows_leave_the_upsample_out(setting):
    """Counting the upsample moves these two math scores off the published values."""
    arch, options, _, math_score, _ = PUBLISHED[setting]
    count = count_micronet(arch, include_upsample=True, **options)
    assert round(count.math_score, 6) != math_score


def test_block_1_worked_example():
    count = count_micronet(ARCH)
    block = count.layer("block_1")
    assert block.params == 1_536 + 864 + 291 + 384 + 2_304 == 5_379
    assert block.mults == 5_167_209
    assert block.adds == 4_590_315
    sizes = [n for path, n in prunable_tensors(ARCH) if path.startswith("blocks_1/")]
    assert sizes == [1_536, 864, 288, 288, 2_304]


def test_write_up_typos_are_not_copied():
    count = count_micronet(ARCH_EXIT4)
    assert count.layer("block_9").params == 104_656
    exit_head = count.layer("exit_head")
    assert exit_head.params == 20_660
    # The write-up books 13,500 of the exit FC's adds as mults: 1,717,436 / 1,596,564.
    assert exit_head.mults == 1_717_436 - 13_500
    assert exit_head.adds == 1_596_564 + 13_500
    assert exit_head.math_ops == 3_314_000


def test_upsample_row():
    count = count_micronet(ARCH, include_upsample=True)
    assert count.layers[0].name == "upsample"
    assert count.layers[0].mults == 63 * 63 * 3 == 11_907
    assert count.mults == 60_456_692 + 11_907
    native = build_architecture(resolution=1.0)
    assert native.image_size == native.input_size
    assert count_micronet(native, include_upsample=True).layer("upsample").mults == 0


# --- conventions ----------------------------------------------------------------------------


def bn_channels_and_elements(arch):
    """Channels and output elements of every BN, straight from the block specs."""
    channels = arch.stem_filters + arch.head_filters
    elements = arch.stem_size**2 * arch.stem_filters + arch.final_size**2 * arch.head_filters
    for b in arch.blocks:
        mid = b.input_filters * b.expand_ratio
        if b.expand_ratio != 1:
            channels += mid
            elements += b.input_size**2 * mid
        channels += mid + b.output_filters
        elements += b.output_size**2 * (mid + b.output_filters)
    if arch.exit_head is not None:
        e = arch.exit_head
        channels += e.input_filters + e.head_filters
        elements += e.size**2 * (e.input_filters + e.head_filters)
    return channels, elements


@pytest.mark.parametrize("arch", [ARCH, ARCH_EXIT4], ids=["main", "exit head"])
def test_bn_as_bias_adds_one_dense_bias_per_bn(arch):
    channels, elements = bn_channels_and_elements(arch)
    plain = count_micronet(arch, sparsity=0.5, exit_ratio=0.0 if arch.exit_head else None)
    with_bn = count_micronet(
        arch, sparsity=0.5, bn_as_bias=True, exit_ratio=0.0 if arch.exit_head else None
    )
    assert with_bn.params - plain.params == channels
    assert with_bn.adds - plain.adds == pytest.approx(elements, abs=1e-3)
    assert with_bn.mults == plain.mults
    assert with_bn.mask_bits == plain.mask_bits


def test_masks_only_for_sparse_tensors():
    exit_n = 432 + 6_528 + 13_600
    dense_exit = count_micronet(ARCH_EXIT4, sparsity=0.64)
    assert dense_exit.mask_bits == 467_824
    assert dense_exit.layer("exit_head").mask_bits == 0
    sparse_exit = count_micronet(ARCH_EXIT4, sparsity=0.64, exit_sparsity=0.5)
    assert sparse_exit.layer("exit_head").mask_bits == exit_n
    assert sparse_exit.layer("exit_head").params == exit_n * 0.5 + 100
    assert count_micronet(ARCH).mask_bits == 0


def test_exit_ratio_mixes_the_two_paths():
    full = count_micronet(ARCH_EXIT4, exit_ratio=0.0)
    early = count_micronet(ARCH_EXIT4, exit_ratio=1.0)
    mixed = count_micronet(ARCH_EXIT4, exit_ratio=0.3)
    assert full.math_ops == count_micronet(ARCH).math_ops + 3_314_000
    exit_path = sum(full.layer(n).math_ops for n in ["stem", *MAIN_ROWS[1:6], "exit_head"])
    assert early.math_ops == pytest.approx(exit_path)
    assert mixed.math_ops == pytest.approx(0.3 * early.math_ops + 0.7 * full.math_ops)
    assert mixed.params == full.params == early.params == 470_776 + 20_660
    assert mixed.layer("block_5").share == pytest.approx(0.7)
    assert mixed.layer("block_4").share == 1.0


def test_bit_widths():
    count = count_micronet(ARCH, param_bits=32, mult_bits=32)
    assert count.param_storage == 470_776
    assert count.math_storage == 117_589_296
    assert count.param_score == pytest.approx(470_776 / 36.5e6)


@pytest.mark.parametrize(
    "options",
    [
        {"sparsity": 1.0},
        {"sparsity": -0.1},
        {"sparsity": float("nan")},
        {"exit_ratio": 0.5},  # no exit head
        {"exit_sparsity": 0.5},  # no exit head
        {"sparsity": 0.5, "params": {}},
        {"param_bits": 0},
    ],
)
def test_bad_options_raise_config_error(options):
    with pytest.raises(ConfigError):
        count_micronet(ARCH, **options)


@pytest.mark.parametrize("ratio", [-0.01, 1.01])
def test_exit_ratio_out_of_range(ratio):
    with pytest.raises(ConfigError, match="exit_ratio"):
        count_micronet(ARCH_EXIT4, exit_ratio=ratio)


# --- actual masks ---------------------------------------------------------------------------


def params_tree(arch, zero_fraction, overrides=None):
    """A params tree with the model's names; the first `fraction` of each kernel is zero."""

    def kernel(path, shape):
        fraction = (overrides or {}).get(path, zero_fraction)
        values = np.ones(int(np.prod(shape)), np.float32)
        values[: int(round(values.size * fraction))] = 0.0
        return values.reshape(shape)

    def bn(c):
        return {"scale": np.ones(c, np.float32), "bias": np.zeros(c, np.float32)}

    def conv(prefix, shape, bias=False):
        out = {"kernel": kernel(prefix + "/kernel", shape)}
        if bias:
            out["bias"] = np.ones(shape[-1], np.float32)
        return out

    tree = {"stem_conv": conv("stem_conv", (3, 3, 3, arch.stem_filters))}
    tree["stem_bn"] = bn(arch.stem_filters)
    for b in arch.blocks:
        p = f"blocks_{b.index}"
        mid = b.input_filters * b.expand_ratio
        block = {}
        if b.expand_ratio != 1:
            block["expand_conv"] = conv(p + "/expand_conv", (1, 1, b.input_filters, mid))
            block["bn0"] = bn(mid)
        k = b.kernel_size
        block["depthwise_conv"] = conv(p + "/depthwise_conv", (k, k, 1, mid))
        block["bn1"] = bn(mid)
        block["se_reduce"] = conv(p + "/se_reduce", (1, 1, mid, b.se_filters), bias=True)
        block["se_expand"] = conv(p + "/se_expand", (1, 1, b.se_filters, mid), bias=True)
        block["project_conv"] = conv(p + "/project_conv", (1, 1, mid, b.output_filters))
        block["bn2"] = bn(b.output_filters)
        tree[p] = block
    last = arch.blocks[-1].output_filters
    tree["head_conv"] = conv("head_conv", (1, 1, last, arch.head_filters))
    tree["head_bn"] = bn(arch.head_filters)
    tree["fc"] = conv("fc", (arch.head_filters, arch.num_classes), bias=True)
    if arch.exit_head is not None:
        e = arch.exit_head
        tree["exit_head"] = {
            "depthwise_conv": conv("exit_head/depthwise_conv", (3, 3, 1, e.input_filters)),
            "bn0": bn(e.input_filters),
            "expand_conv": conv("exit_head/expand_conv", (1, 1, e.input_filters, e.head_filters)),
            "bn1": bn(e.head_filters),
            "fc": conv("exit_head/fc", (e.head_filters, arch.num_classes), bias=True),
        }
    return tree


def test_prunable_tensors_are_the_trees_multi_dim_leaves():
    tree = params_tree(ARCH_EXIT4, 0.0)
    leaves = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, prefix + key + "/")
            elif value.ndim > 1:
                leaves[prefix + key] = value.size

    walk(tree, "")
    assert dict(prunable_tensors(ARCH_EXIT4)) == leaves


def test_actual_masks_with_a_quarter_zeros_equal_uniform_quarter():
    """Every kernel size here is a multiple of 4, so 25% zeros is an exact density of 0.75."""
    tree = params_tree(ARCH_EXIT4, 0.25)
    actual = count_micronet(ARCH_EXIT4, params={"params": tree}, exit_ratio=0.4)
    uniform = count_micronet(ARCH_EXIT4, sparsity=0.25, exit_sparsity=0.25, exit_ratio=0.4)
    for a, u in zip(actual.layers, uniform.layers, strict=True):
        assert a.name == u.name
        for field in ("params", "mults", "adds", "mask_bits"):
            assert getattr(a, field) == pytest.approx(getattr(u, field), rel=1e-12), a.name
    assert measured_sparsity(ARCH_EXIT4, tree) == (pytest.approx(0.25), pytest.approx(0.25))


def test_actual_masks_read_each_tensor():
    tree = params_tree(ARCH, 0.0, overrides={"head_conv/kernel": 0.5, "fc/kernel": 0.75})
    count = count_micronet(ARCH, params=tree)
    dense = count_micronet(ARCH)
    head, fc = count.layer("head"), count.layer("fc")
    assert head.params == 13_056 / 2
    assert head.mask_bits == 13_056
    assert head.mults == 96 * 0.5 * 7 * 7 * 136 + 3 * 7 * 7 * 136
    assert fc.params == 13_600 / 4 + 100
    assert fc.mults == 136 * 0.25 * 100
    assert fc.adds == (136 * 0.25 - 1) * 100 + 100
    for name in MAIN_ROWS[:-3]:
        assert count.layer(name) == dense.layer(name)
    main, exit_sparsity = measured_sparsity(ARCH, tree)
    assert main == pytest.approx((13_056 / 2 + 13_600 * 0.75) / 467_824)
    assert exit_sparsity == 0.0


def test_actual_masks_reject_a_tree_of_another_architecture():
    tree = params_tree(build_architecture(width=1.0), 0.0)
    with pytest.raises(CheckpointError, match="weights"):
        count_micronet(ARCH, params=tree)
    with pytest.raises(CheckpointError, match="exit_head"):
        count_micronet(ARCH_EXIT4, params=params_tree(ARCH, 0.0))


# --- other architectures and the model ------------------------------------------------------


def independent_params(arch):
    """Weights and biases summed from the block specs' shapes (BN not counted)."""
    total = 3 * 3 * 3 * arch.stem_filters
    for b in arch.blocks:
        mid, r = b.input_filters * b.expand_ratio, b.se_filters
        total += b.input_filters * mid if b.expand_ratio != 1 else 0
        total += b.kernel_size**2 * mid
        total += (mid * r + r) + (r * mid + mid)
        total += mid * b.output_filters
    total += arch.blocks[-1].output_filters * arch.head_filters
    total += arch.head_filters * arch.num_classes + arch.num_classes
    return total


K5_BLOCKS = (
    "r1_k3_s1_e1_i32_o16_se0.25",
    "r2_k5_s2_e6_i16_o24_se0.25",
    "r2_k5_s1_e6_i24_o40_se0.25",
)


@pytest.mark.parametrize(
    "arch",
    [
        build_architecture(width=1.0, resolution=1.0),
        build_architecture(width=1.0, resolution=1.0, depth=2.0),
        build_architecture(K5_BLOCKS, width=1.2, resolution=1.2, head_filters=64),
    ],
    ids=["w1.0 r1.0", "depth 2", "kernel 5"],
)
def test_other_architectures_are_counted_from_their_specs(arch):
    count = count_micronet(arch)
    assert count.params == independent_params(arch)
    assert [layer.name for layer in count.layers] == (
        ["stem"] + [f"block_{b.index}" for b in arch.blocks] + ["head", "pool", "fc"]
    )
    assert count.layer("pool").adds == (arch.final_size**2 - 1) * arch.head_filters
    assert count.layer("fc").mults == arch.head_filters * arch.num_classes
    assert count.params != count_micronet(ARCH).params


@pytest.mark.parametrize("exit_block", [None, 4])
def test_counter_matches_the_flax_parameter_tree(exit_block):
    jax = pytest.importorskip("jax")
    efficientnet = pytest.importorskip("micronet_jax.models.efficientnet")
    arch = ARCH.with_exit_head(exit_block)
    model = efficientnet.MicroNet(arch=arch)
    x = jax.numpy.zeros((4, 32, 32, 3), jax.numpy.float32)
    init = functools.partial(model.init, train=False)
    shapes = jax.eval_shape(init, jax.random.key(0), x)["params"]

    def is_bn(name):
        return name.endswith("_bn") or name in ("bn0", "bn1", "bn2")

    def sizes(node, bias_of_bn):
        total = 0
        for key, value in node.items():
            if hasattr(value, "shape"):
                total += int(np.prod(value.shape))
            elif is_bn(key):
                total += int(np.prod(value["bias"].shape)) if bias_of_bn else 0
            else:
                total += sizes(value, bias_of_bn)
        return total

    rows = {"stem": ["stem_conv", "stem_bn"], "head": ["head_conv", "head_bn"], "fc": ["fc"]}
    rows |= {f"block_{b.index}": [f"blocks_{b.index}"] for b in arch.blocks}
    if exit_block is not None:
        rows["exit_head"] = ["exit_head"]
    assert sorted(k for keys in rows.values() for k in keys) == sorted(shapes)
    for bn_as_bias in (False, True):
        count = count_micronet(arch, bn_as_bias=bn_as_bias)
        for row, keys in rows.items():
            expected = sizes({k: shapes[k] for k in keys}, bn_as_bias)
            assert count.layer(row).params == expected, (row, bn_as_bias)

    # The real tree carries every tensor the counter reads, with the sizes it expects.
    tree = jax.tree_util.tree_map(lambda s: np.ones(s.shape, np.float32), shapes)
    assert count_micronet(arch, params=tree).params == count_micronet(arch).params


# --- command line ---------------------------------------------------------------------------


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "micronet_jax.score", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def test_cli_json_of_the_headline_entry():
    result = run_cli("--sparsity=0.64", "--exit_block=4", "--exit_ratio=0.3217", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    for key in ("layers", "params", "mults", "adds", "param_score", "math_score", "score"):
        assert key in data
    names = [layer["name"] for layer in data["layers"]]
    assert names == MAIN_ROWS + ["exit_head"]
    for layer in data["layers"]:
        assert {"name", "params", "mults", "adds"} <= set(layer)
    assert (round(data["param_score"], 6), round(data["math_score"], 6)) == (0.003031, 0.002753)
    assert round(data["score"], 6) == 0.005784


def test_cli_table_of_the_dense_network(capsys):
    assert score.main(["--include_upsample"]) == 0
    out = capsys.readouterr().out
    for row in ["upsample", "stem", "block_9", "head", "pool", "fc"]:
        assert f"\n{row} " in out
    assert "470,776" in out and "11,907" in out
    assert "param score  0.006449" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sparsity=1.0"], "sparsity"),
        (["--sparsity=-0.2"], "sparsity"),
        (["--exit_block=4", "--exit_ratio=1.5"], "exit_ratio"),
        (["--exit_block=9"], "exit_block"),
        (["--exit_block=-1"], "exit_block"),
        (["--exit_ratio=0.3"], "exit head"),
        (["--exit_block=4", "--exit_sparsity=1"], "exit_sparsity"),
        (["--checkpoint=/nonexistent/model.pth"], "no file"),
    ],
)
def test_cli_bad_values_exit_with_one_message(capsys, args, message):
    assert score.main(args) != 0
    captured = capsys.readouterr()
    assert message in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_cli_bad_value_in_a_subprocess_has_no_traceback():
    result = run_cli("--exit_block=4", "--exit_ratio=2")
    assert result.returncode != 0
    assert "exit_ratio" in result.stderr and "Traceback" not in result.stderr


# --- the original's checkpoints -------------------------------------------------------------


@pytest.mark.shared
@pytest.mark.parametrize(
    "folder, extra, published",
    [
        ("first_submission", ["--exit_ratio=0.3217"], (0.003031, 0.002753, 0.005784)),
        (
            "final_ee50",
            ["--exit_ratio=0.2929", "--bn_as_bias", "--include_upsample"],
            (0.002995, 0.002803, 0.005798),
        ),
    ],
)
def test_cli_scores_the_original_checkpoints(
    original_checkpoints, capsys, folder, extra, published
):
    pytest.importorskip("micronet_jax.models.torch_import")
    path = original_checkpoints / folder / "trained_model.pth"
    assert score.main([f"--checkpoint={path}", "--json", *extra]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["sparsity"] == pytest.approx(299_407 / 467_824)
    assert data["exit_sparsity"] == pytest.approx(0.5 if folder == "final_ee50" else 0.0, abs=1e-3)
    convention = data["published_convention"]
    scores = tuple(round(convention[k], 6) for k in ("param_score", "math_score", "score"))
    assert scores == published
    # Every tensor is sparse here, so storage depends only on how many weights survive.
    assert data["actual"]["param_score"] == pytest.approx(convention["param_score"], rel=1e-6)
    assert data["actual"]["math_score"] != pytest.approx(convention["math_score"], rel=1e-6)


def test_cli_checkpoint_flow_with_a_stand_in_converter(monkeypatch, capsys, tmp_path):
    """The CLI's checkpoint path, with `load_original` replaced by a known params tree."""
    import types

    tree = params_tree(ARCH_EXIT4, 0.5, overrides={"stem_conv/kernel": 0.0, "fc/kernel": 0.9})
    loaded = types.SimpleNamespace(arch=ARCH_EXIT4, variables={"params": tree, "batch_stats": {}})
    fake = types.ModuleType("micronet_jax.models.torch_import")
    fake.load_original = lambda path: loaded
    monkeypatch.setitem(sys.modules, "micronet_jax.models.torch_import", fake)
    path = tmp_path / "trained_model.pth"
    path.write_bytes(b"")

    assert score.main([f"--checkpoint={path}", "--exit_ratio=0.25", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    kept = 648 + 13_600 * 0.1 + (467_824 - 648 - 13_600) * 0.5
    assert data["sparsity"] == pytest.approx(1 - kept / 467_824)
    assert data["exit_sparsity"] == pytest.approx(0.5)
    honest, convention = data["actual"], data["published_convention"]
    stem = honest["layers"][0]
    assert (stem["name"], stem["params"], stem["mask_bits"]) == ("stem", 648, 0)
    # Same surviving weights; the honest count needs no mask for the dense stem.
    saved_mask = 648 / 32 / 36.5e6
    assert convention["param_score"] - honest["param_score"] == pytest.approx(saved_mask)
    assert honest["math_score"] != pytest.approx(convention["math_score"], rel=1e-6)

    assert score.main([f"--checkpoint={path}", "--exit_ratio=0.25"]) == 0
    out = capsys.readouterr().out
    assert "actual masks" in out and "published" in out

    assert score.main([f"--checkpoint={path}", "--exit_block=3"]) != 0
    assert "exit_block" in capsys.readouterr().err
    assert score.main([f"--checkpoint={path}", "--sparsity=0.5"]) != 0
    assert "read from --checkpoint" in capsys.readouterr().err


# --- quantised entries (the challenge's rules for them), counted by hand on a toy network ---
#
# One MBConv r1_k3_s1_e1_i8_o8_se0.25 at width and resolution 1: a 3x3/2 stem 3->8 (16x16
# out), the block (depthwise 3x3 on 16x16x8, SE 8->2->8 with biases, project 8->8, skip), a
# 1x1 head 8->16, pooling and fc 16->10. Dense: 692 weights and biases.
TOY = build_architecture(
    ("r1_k3_s1_e1_i8_o8_se0.25",), width=1.0, resolution=1.0, head_filters=16, num_classes=10
)
TOY_PARAMS = 216 + 72 + (16 + 2) + (16 + 8) + 64 + 128 + (160 + 10)
# Scales of an 8/8 entry with per-tensor input grids: one per output channel, and a scale and
# a zero point per input tensor of each layer: stem 8+2, depthwise 8+2, SE reduce 2+2,
# SE expand 8+2, project 8+2, head 16+2, fc 10+2.
TOY_SCALES = 10 + 10 + 4 + 10 + 10 + 18 + 12


def test_toy_weights_and_activations_at_8_bits():
    count = count_micronet(TOY, bits=BitWidths(8, 8, depthwise_channels=False))
    assert count.params == TOY_PARAMS + TOY_SCALES == 766
    # weights at 8 bits, scales, zero points and biases (SE's 10, fc's 10) at 32; bits:
    #   stem 216·8 + 10·32 = 2,048; block 72·8 + 10·32 + (16·8 + 4·32 + 2·32)
    #   + (16·8 + 10·32 + 8·32) + 64·8 + 10·32 = 2,752; head 128·8 + 18·32 = 1,600;
    #   fc 160·8 + 12·32 + 10·32 = 1,984: 8,384 bits = 262 parameters of 32 bits
    assert [round(layer.storage * 32) for layer in count.layers] == [2048, 2752, 1600, 0, 1984]
    assert count.param_storage == 262
    # conv multiplications at 8 bits (the wider input: 8 and 8), elementwise ones at 32:
    #   stem 27·2,048·8 + 3·2,048·32 = 638,976; block 9·2,048·8 + 3·2,048·32 (depthwise,
    #   swish) + 8·32 (pool) + 16·8 + 6·32 + 16·8 + 16·32 (SE convs, swish, sigmoid)
    #   + 2,048·32 (SE scale) + 8·2,048·8 (project) = 541,888; head 8·4,096·8 + 3·4,096·32
    #   = 655,360; pool 16·32 = 512; fc 160·8 = 1,280: 1,838,016 bits
    assert [layer.mult_bits for layer in count.layers] == [638976, 541888, 655360, 512, 1280]
    # additions, 32 bits each: stem 26·2,048 + 2,048; block 8·2,048 + 2,048 + 255·8
    #   + (7·2 + 2 + 2) + (1·8 + 8 + 8) + 7·2,048 + 2,048 (skip); head 7·4,096 + 4,096;
    #   pool 255·16; fc 15·10 + 10
    assert [layer.adds for layer in count.layers] == [55296, 36898, 32768, 4080, 160]
    assert count.math_storage == 1_838_016 / 32 + 129_202 == 186_640


def test_toy_depthwise_input_grids_per_channel():
    """The depthwise conv's 8 input channels each get a scale and a zero point: 14 more fp32
    values than one grid (16 against 2); the block stores 2,752 + 14·32 = 3,200 bits, the
    entry 8,832 bits = 276 parameters; the arithmetic is unchanged."""
    count = count_micronet(TOY, bits=BitWidths(8, 8))
    assert count.params == TOY_PARAMS + TOY_SCALES + 14 == 780
    assert [round(layer.storage * 32) for layer in count.layers] == [2048, 3200, 1600, 0, 1984]
    assert count.param_storage == 276
    assert count.math_storage == 186_640


def test_toy_16_bits_keeps_the_freebie():
    """Nothing below 16 bits: everything counts at 16, as when nothing is said, no scales."""
    free = count_micronet(TOY)
    assert free.param_storage == TOY_PARAMS * 16 / 32 == 346
    half = count_micronet(TOY, bits=BitWidths(16, 16))
    assert (half.params, half.param_storage, half.math_storage) == (
        free.params,
        free.param_storage,
        free.math_storage,
    )


def test_toy_one_layer_below_16_bits_ends_the_freebie():
    """Quantise only fc to 8 bits: every other value and multiplication is charged at 32."""
    count = count_micronet(TOY, bits=BitWidths(overrides=(("fc", 8, 8),)))
    # (692 - 170) values at 32 bits + fc's 160·8 + 12 scales·32 + 10 biases·32
    assert count.param_storage * 32 == 522 * 32 + 1280 + 384 + 320 == 18_688
    assert count.layer("stem").mult_bits == (27 * 2048 + 3 * 2048) * 32
    assert count.layer("fc").mult_bits == 160 * 8


def test_toy_multiplications_cost_their_widest_input():
    four_eight = count_micronet(TOY, bits=BitWidths(4, 8)).layer("head")
    eight_full = count_micronet(TOY, bits=BitWidths(8, 32)).layer("head")
    # the head's 1x1 conv: 8·4,096 multiplications; its swish 3·4,096 at 32 bits
    assert four_eight.mult_bits == 8 * 4096 * 8 + 3 * 4096 * 32
    assert eight_full.mult_bits == 8 * 4096 * 32 + 3 * 4096 * 32
    # 4-bit weights store at 4 bits (+16 channel scales, +the input's scale and zero point)
    assert four_eight.storage * 32 == 128 * 4 + 18 * 32
    # 32-bit activations need no scale: 128·8 + 16 channel scales
    assert eight_full.storage * 32 == 128 * 8 + 16 * 32


def test_toy_masks_are_one_bit_beside_the_kept_values():
    count = count_micronet(TOY, sparsity=0.5, bits=BitWidths(8, 8))
    stem = count.layer("stem")
    # 108 kept weights at 8 bits, a 216-bit mask, 8 + 2 scales and zero point at 32
    assert stem.storage * 32 == 108 * 8 + 216 + 10 * 32
    assert stem.mult_bits == 13.5 * 2048 * 8 + 3 * 2048 * 32


def test_toy_bn_as_bias_is_a_float32_bias_when_quantised():
    plain = count_micronet(TOY, bits=BitWidths(8, 8))
    with_bn = count_micronet(TOY, bits=BitWidths(8, 8), bn_as_bias=True)
    # BN after the stem (8), depthwise (8), project (8) and head (16): 40 values at 32 bits,
    # one add per output element: 2,048 + 2,048 + 2,048 + 4,096
    assert with_bn.param_storage - plain.param_storage == 40
    assert with_bn.math_storage - plain.math_storage == 10_240


def test_bit_widths_compose_with_an_exit_head_and_its_ratio():
    bits = BitWidths(8, 8)
    stay, leave = (count_micronet(ARCH_EXIT4, bits=bits, exit_ratio=r) for r in (0.0, 1.0))
    half = count_micronet(ARCH_EXIT4, bits=bits, exit_ratio=0.5)
    assert half.math_storage == pytest.approx((stay.math_storage + leave.math_storage) / 2)
    assert half.param_storage == stay.param_storage  # storage does not depend on the ratio
    # the exit head's three kernels are quantised too: 48 + 136 + 100 channel scales, and
    # a scale and a zero point per input grid: 48 for the depthwise conv's channels, one
    # each for the 1x1 conv's and the classifier's input
    head = half.layer("exit_head")
    dense_head = count_micronet(ARCH_EXIT4, exit_ratio=0.5).layer("exit_head")
    assert head.params == dense_head.params + 48 + 136 + 100 + 2 * (48 + 1 + 1)


def test_overrides_take_the_longest_prefix():
    bits = BitWidths(4, 4, (("blocks_", 6, 6), ("blocks_3", 8, 32), ("stem_conv", 8, 32)))
    assert bits.of("blocks_3/expand_conv/kernel") == (8, 32)
    assert bits.of("blocks_2/expand_conv/kernel") == (6, 6)
    assert bits.of("stem_conv/kernel") == (8, 32)
    assert bits.of("fc/kernel") == (4, 4)
    assert bits.quantised and not BitWidths(16, 32).quantised
    assert parse_override("fc=8,32") == ("fc", 8, 32) and parse_override("fc=8") == ("fc", 8, 8)
    for bad in ("fc", "fc=eight", "=8"):
        with pytest.raises(ConfigError, match="PREFIX"):
            parse_override(bad)
    with pytest.raises(ConfigError, match="bit widths"):
        BitWidths(1, 8)


def test_cli_bit_widths_of_a_configuration(capsys):
    args = ["--sparsity=0.64", "--exit_block=4", "--exit_ratio=0.3217"]
    assert score.main([*args, "--weight_bits", "8", "--activation_bits", "8", "--json"]) == 0
    eight = json.loads(capsys.readouterr().out)
    assert score.main([*args, "--json"]) == 0
    free = json.loads(capsys.readouterr().out)
    assert eight["widths"] == "weights 8-bit, activations 8-bit; depthwise inputs per channel"
    assert eight["settings"]["weight_bits"] == 8
    assert eight["param_score"] < free["param_score"]
    expected = count_micronet(ARCH_EXIT4, sparsity=0.64, exit_ratio=0.3217, bits=BitWidths(8, 8))
    assert eight["score"] == pytest.approx(expected.score)
    per_tensor = ["--weight_bits", "8", "--activation_bits", "8", "--depthwise_per_tensor"]
    assert score.main([*args, *per_tensor, "--json"]) == 0
    tensor = json.loads(capsys.readouterr().out)
    assert tensor["widths"].endswith("depthwise inputs per tensor")
    assert tensor["param_score"] < eight["param_score"]  # fewer grids, fewer fp32 scales
    assert tensor["math_score"] == eight["math_score"]
    assert score.main([*args, "--bits", "fc=eight"]) == 2
    assert "PREFIX" in capsys.readouterr().err


@pytest.mark.shared
def test_cli_bit_widths_of_the_final_checkpoint(original_checkpoints):
    path = original_checkpoints / "final_ee50" / "trained_model.pth"
    args = [f"--checkpoint={path}", "--bn_as_bias", "--exit_block", "4"]
    args += ["--exit_ratio", "0.2929", "--weight_bits", "8", "--activation_bits", "8"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "weights 8-bit, activations 8-bit" in result.stdout
    assert "score" in result.stdout.splitlines()[-1]
    honest = float(result.stdout.split("score")[-1].split()[0])
    assert 0.0040 < honest < 0.0060
