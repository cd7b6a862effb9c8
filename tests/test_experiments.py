"""Each experiment at its smallest setting: the files it promises exist and hold what they say."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from archives import make_cifar10_python_archive

from experiments import architecture_search, autoaugment_search, exit_sweep, scaling_search
from micronet_jax.config.validate import check_policy_file
from micronet_jax.data.policy import Policy, load_policy
from micronet_jax.models.architecture import BASE_BLOCK_STRINGS, build_architecture
from micronet_jax.scoring.counter import count_micronet, measured_sparsity

pytest.importorskip("optuna")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "cifar-10-python.tar.gz"
    make_cifar10_python_archive(path, n_train=200, n_test=40)
    return path


def tiny_args(archive: Path, out: Path, trials: int = 1) -> list[str]:
    return [
        f"--out={out}",
        f"--data={archive}",
        "--num_train=64",
        "--num_val=32",
        "--epochs=1",
        "--batch_size=32",
        f"--trials={trials}",
        "--startup_trials=1",
        f"--cache={out.parent / 'xla'}",
    ]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def assert_outputs(out: Path, columns: tuple[str, ...], n: int) -> list[dict[str, str]]:
    rows = read_csv(out / "trials.csv")
    assert tuple(rows[0]) == columns
    assert [int(r["trial"]) for r in rows] == list(range(n))
    assert all(
        math.isfinite(float(r["val_loss"])) and 0 <= float(r["val_accuracy"]) <= 1 for r in rows
    )
    assert (out / "trials.md").read_text().count("\n|") >= n + 1
    assert len(json.loads((out / "trials.json").read_text())) == n
    assert (out / "trials.png").read_bytes()[:4] == b"\x89PNG"
    return rows


@pytest.mark.slow
def test_autoaugment_search_emits_a_policy_the_recipe_loads(archive, tmp_path):
    out = tmp_path / "aa"
    assert autoaugment_search.main(tiny_args(archive, out, trials=2)) == 0
    rows = assert_outputs(out, autoaugment_search.COLUMNS, 2)
    path = out / "best_policy.json"
    check_policy_file(str(path))
    policy = Policy.from_rows(load_policy(str(path)))
    assert len(policy) == 25
    # the emitted policy is the best trial's
    best = min(range(2), key=lambda i: float(rows[i]["val_loss"]))
    trials = json.loads((out / "trials.json").read_text())
    assert [list(r) for r in policy.rows] == trials[best]["policy"]


def test_architecture_space_makes_valid_networks():
    original = architecture_search.block_strings((2, 5), (1, 1, 2, 1, 2, 2, 1), (3,) * 7, 0.2)
    assert original == BASE_BLOCK_STRINGS
    blocks = architecture_search.block_strings((1, 3), (3, 1, 1, 2, 1, 1, 1), (5,) * 7, 0.37)
    arch = build_architecture(blocks)
    assert sum(b.stride == 2 for b in arch.blocks) == 2
    assert len(arch.blocks) == 10 and {b.kernel_size for b in arch.blocks} == {5}
    assert arch.blocks[0].se_filters == int(arch.blocks[0].input_filters * 0.37)


@pytest.mark.slow
def test_architecture_search_scores_the_original_first(archive, tmp_path):
    out = tmp_path / "arch"
    assert architecture_search.main(tiny_args(archive, out)) == 0
    (row,) = assert_outputs(out, architecture_search.COLUMNS, 1)
    assert tuple(row["blocks"].split()) == BASE_BLOCK_STRINGS
    dense = count_micronet(build_architecture())
    assert float(row["score"]) == pytest.approx(dense.score)
    assert round(float(row["score"]), 6) == 0.014777  # published: dense row


@pytest.mark.slow
def test_scaling_search_couples_width_to_resolution(archive, tmp_path):
    out = tmp_path / "scaling"
    assert scaling_search.main(tiny_args(archive, out)) == 0
    (row,) = assert_outputs(out, scaling_search.COLUMNS, 1)
    resolution, width = float(row["resolution"]), float(row["width"])
    assert 1.0 <= resolution <= 1.4
    assert width == pytest.approx(math.sqrt(2) / resolution)
    arch = build_architecture(width=width, resolution=resolution)
    assert int(row["image_size"]) == arch.image_size
    assert float(row["score"]) == pytest.approx(count_micronet(arch).score)


@pytest.mark.slow
@pytest.mark.shared
def test_exit_sweep_matches_the_counter(original_checkpoints, archive, tmp_path):
    from micronet_jax.models.torch_import import load_original

    checkpoint = original_checkpoints / "first_submission" / "trained_model.pth"
    out = tmp_path / "exit"
    argv = [
        f"--out={out}",
        f"--checkpoint={checkpoint}",
        f"--data={archive}",
        "--num_test=40",
        "--num_train=32",
        "--steps=2",
        "--batch_size=16",
        "--positions=3,4",
        f"--cache={tmp_path / 'xla'}",
    ]
    assert exit_sweep.main(argv) == 0
    rows = read_csv(out / "exit_sweep.csv")
    assert [(int(r["exit_block"]), float(r["threshold"])) for r in rows] == [
        (p, t) for p in (3, 4) for t in exit_sweep.THRESHOLDS
    ]
    loaded = load_original(checkpoint)
    sparsity, _ = measured_sparsity(loaded.arch, loaded.variables["params"])
    for r in rows:
        assert 0 <= float(r["exit_ratio"]) <= 1 and 0 <= float(r["accuracy"]) <= 1
        arch = loaded.arch.with_exit_head(int(r["exit_block"]))
        assert float(r["sparsity"]) == pytest.approx(sparsity)
        expected = count_micronet(
            arch,
            sparsity=sparsity,
            exit_sparsity=float(r["exit_sparsity"]),
            exit_ratio=float(r["exit_ratio"]),
        )
        assert float(r["score"]) == pytest.approx(expected.score, rel=1e-9)
        assert float(r["math_score"]) == pytest.approx(expected.math_score, rel=1e-9)
        assert 0 < float(r["exit_path_share"]) < 1
        # only exiting samples can disagree with the full network
        assert float(r["agreement"]) >= 1 - float(r["exit_ratio"]) - 1e-9
    # an earlier exit saves more; the main path is the same whichever head is attached
    share = {int(r["exit_block"]): float(r["exit_path_share"]) for r in rows}
    assert share[3] < share[4]
    assert len({r["main_accuracy"] for r in rows}) == 1
    # a higher threshold never lets more samples exit
    for p in (3, 4):
        ratios = [float(r["exit_ratio"]) for r in rows if int(r["exit_block"]) == p]
        assert ratios == sorted(ratios, reverse=True)
    assert (out / "exit_sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "out of domain" in (out / "exit_sweep.md").read_text()
    data = json.loads((out / "exit_sweep.json").read_text())
    assert np.isclose(data[0]["score"], float(rows[0]["score"]))


@pytest.mark.slow
@pytest.mark.shared
def test_ptq_table_scores_what_it_quantised(original_checkpoints, cifar10_archive, tmp_path):
    """On real CIFAR-10 images (a random archive would make every agreement a coin's): the
    8x8 rows keep most predictions and the confident ones (the full table: 89.8% and 100%
    on 10,000 images), and the scores are the counter's at those widths."""
    from experiments import ptq
    from micronet_jax.models.torch_import import load_original
    from micronet_jax.quant.fake import quantize_weights
    from micronet_jax.quant.widths import BitWidths
    from micronet_jax.scoring.counter import count_micronet

    out = tmp_path / "ptq"
    argv = [f"--out={out}", f"--data={cifar10_archive}", f"--checkpoints={original_checkpoints}"]
    options = ["--num_test=300", "--num_calibration=64", "--bits", "8x8", "--methods", "nearest"]
    options += ["--calibration", "cifar10", "--floors"]  # no synthetic rows, no search
    assert ptq.main([*argv, *options, "--scale_bits"]) == 0
    rows = read_csv(out / "ptq.csv")
    assert [(r["checkpoint"], r["bits"], r["method"]) for r in rows] == [
        (name, bits, method)
        for name in ("first_submission", "final_ee50")
        for bits, method in (("float32 (16-bit freebie)", ""), ("8x8", "nearest"))
    ]
    final = load_original(original_checkpoints / "final_ee50" / "trained_model.pth")
    params = quantize_weights(final.variables["params"], BitWidths(8, 8))
    expected = count_micronet(
        final.arch, params=params, exit_ratio=0.2929, bn_as_bias=True, bits=BitWidths(8, 8)
    )
    assert float(rows[3]["score_published_ratio"]) == pytest.approx(expected.score, rel=1e-5)
    assert float(rows[3]["param_score"]) < float(rows[2]["param_score"])
    for row in (rows[1], rows[3]):
        assert float(row["main_agreement"]) >= 0.75
        assert float(row["confident_agreement"]) >= 0.95
    assert (out / "ptq.md").read_text().count("\n|") >= 5


def test_ptq_search_without_enough_held_out_images_is_one_clear_error(archive, tmp_path):
    from experiments import ptq

    argv = [f"--out={tmp_path}", f"--data={archive}", "--num_test=40", "--num_calibration=40"]
    with pytest.raises(SystemExit, match="lower --fisher_images/--held_out"):
        ptq.main([*argv, "--floors", "0.97"])  # 160 more training images, not 256 + 1,000


@pytest.mark.slow
@pytest.mark.shared
def test_ptq_frontier_writes_width_files_that_reproduce_its_rows(
    original_checkpoints, archive, tmp_path
):
    """The mixed-precision search end to end on the released final network: frontier rows
    sorted by score with agreement rising, each row's widths in a width file that, read back,
    scores what the row says."""
    from experiments import ptq
    from micronet_jax.models.fold import fold_batch_norm
    from micronet_jax.models.torch_import import load_original
    from micronet_jax.quant.fake import quantize_weights
    from micronet_jax.quant.widths import load_widths
    from micronet_jax.scoring.counter import count_micronet

    out = tmp_path / "ptq"
    argv = [f"--out={out}", f"--data={archive}", f"--checkpoints={original_checkpoints}"]
    options = ["--only", "final_ee50", "--num_test=40", "--num_calibration=40", "--bits", "8x8"]
    options += ["--methods", "nearest", "--scale_bits", "--calibration", "cifar10"]
    search = ["--floors", "0.5", "--frontier_method", "nearest", "--fisher_images=32"]
    search += ["--held_out=40", "--sweep_points=3"]
    assert ptq.main([*argv, *options, *search]) == 0
    rows = read_csv(out / "frontier.csv")
    assert rows, "the frontier is empty"
    scores = [float(r["score_published_ratio"]) for r in rows]
    assert scores == sorted(scores)
    held_out = [float(r["held_out_agreement"]) for r in rows]
    assert held_out == sorted(held_out)
    assert any(r["floor_met"] == "0.5" for r in rows)
    final = load_original(original_checkpoints / "final_ee50" / "trained_model.pth")
    params = fold_batch_norm(final.variables)["params"]
    assert len(list((out / "widths").glob("*.json"))) == len(rows)
    for row in rows:
        bits = load_widths(row["widths_file"])
        counted = count_micronet(
            final.arch,
            params=quantize_weights(params, bits),
            exit_ratio=0.2929,
            bn_as_bias=True,
            bits=bits,
        )
        assert counted.score == pytest.approx(float(row["score_published_ratio"]), rel=1e-5)
    assert "| configuration |" in (out / "frontier.md").read_text()


@pytest.mark.slow
@pytest.mark.shared
def test_sixteen_bit_values_keep_the_predictions(original_checkpoints, archive, tmp_path):
    from experiments import sixteen_bit

    out = tmp_path / "sixteen"
    argv = [f"--out={out}", f"--data={archive}", f"--checkpoints={original_checkpoints}"]
    variant = "fp16 values, fp32 arithmetic"
    assert sixteen_bit.main([*argv, "--num_test=40", "--variants", variant]) == 0
    rows = read_csv(out / "sixteen_bit.csv")
    assert [(r["checkpoint"], r["bn"]) for r in rows] == [
        (name, bn) for name in ("first_submission", "final_ee50") for bn in ("as is", "folded")
    ]
    for row in rows:  # float16 rounding moves logits by hundredths: at most a near tie flips
        assert float(row["main_agreement"]) >= 0.9
        assert 0 < float(row["max_logit_diff_main"]) < 0.5
