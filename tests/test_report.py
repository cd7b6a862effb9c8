"""`python -m micronet_jax.report --workdir`: every plot of a finished run, with its data."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from micronet_jax.config import builders
from micronet_jax.evaluation import plots
from micronet_jax.recipe.run_plots import load_run_config
from micronet_jax.recipe.stages import stage_dirs
from micronet_jax.report import main
from micronet_jax.scoring.counter import count_micronet

pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]
PLOTS = {
    "training_curves": ("stage", "epoch", "train_loss", "test_accuracy"),
    "accuracy_vs_sparsity": ("stage", "target", "sparsity", "test_accuracy"),
    "layer_params": None,  # data in layer_costs.csv
    "layer_math_ops": None,
    "exit_tradeoff": ("exit_block", "threshold", "exit_ratio", "accuracy", "math_score"),
}


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def run_dir(tiny_pipeline_copy) -> Path:
    """The finished tiny pipeline, copied: these tests write plots (and a sweep) into it."""
    return tiny_pipeline_copy


@pytest.mark.slow
def test_cli_writes_every_plot_and_its_data(run_dir, compile_cache):
    out = subprocess.run(
        [sys.executable, "-m", "micronet_jax.report", f"--workdir={run_dir}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MICRONET_CACHE_DIR": str(compile_cache)},
    )
    assert out.returncode == 0, out.stderr
    plot_dir = run_dir / "plots"
    for name, columns in PLOTS.items():
        png = plot_dir / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert png.stat().st_size > 10_000, name  # more than empty axes
        if columns:
            rows = read_csv(plot_dir / f"{name}.csv")
            assert rows and set(columns) <= set(rows[0]), name
    assert read_csv(plot_dir / "layer_costs.csv")


@pytest.mark.slow
def test_plot_data_agree_with_the_run(run_dir):
    assert main([f"--workdir={run_dir}", f"--out={run_dir / 'again'}"]) == 0
    out = run_dir / "again"
    report = json.loads((run_dir / "report.json").read_text())
    config = load_run_config(run_dir)
    arch = builders.architecture_from_config(config, with_exit=True)
    ratio = report["metrics"]["exit_ratio"]
    layers = read_csv(out / "layer_costs.csv")
    dense = count_micronet(arch, exit_ratio=ratio)
    assert [r["layer"] for r in layers] == [layer.name for layer in dense.layers]
    assert sum(float(r["dense_math_ops"]) for r in layers) == pytest.approx(dense.math_ops)
    actual = report["score_actual_masks"]
    assert sum(float(r["pruned_params"]) for r in layers) == pytest.approx(actual["param_storage"])
    assert sum(float(r["pruned_math_ops"]) for r in layers) == pytest.approx(actual["math_ops"])
    # pruning only removes: every pruned layer costs at most its dense version
    assert all(float(r["pruned_params"]) <= float(r["dense_params"]) + 1e-9 for r in layers)

    curves = read_csv(out / "training_curves.csv")
    assert [r["stage"] for r in curves][0] == "stage_a"
    assert [int(r["epoch"]) for r in curves] == list(range(1, len(curves) + 1))
    assert {d.name for d in stage_dirs(run_dir)} == {r["stage"] for r in curves}

    sparsity = read_csv(out / "accuracy_vs_sparsity.csv")
    assert [float(r["sparsity"]) for r in sparsity[:3]] == pytest.approx([0, 0.3, 0.6], abs=0.01)

    sweep = read_csv(out / "exit_tradeoff.csv")
    ratios = [float(r["exit_ratio"]) for r in sweep]
    assert ratios == sorted(ratios, reverse=True) and all(0 <= x <= 1 for x in ratios)
    threshold = report["threshold"]
    (at_run,) = [r for r in sweep if float(r["threshold"]) == threshold]
    assert float(at_run["exit_ratio"]) == pytest.approx(ratio)
    assert float(at_run["accuracy"]) == pytest.approx(report["metrics"]["accuracy"])


@pytest.mark.slow
def test_an_exit_sweep_csv_is_plotted_when_present(run_dir, tmp_path):
    rows = [
        {"exit_block": b, "threshold": t, "exit_ratio": 0.5, "accuracy": a, "math_score": m}
        for b, t, a, m in ((1, 0.8, 0.5, 0.002), (1, 0.9, 0.6, 0.003), (2, 0.8, 0.55, 0.004))
    ]
    plots.write_rows(run_dir / "exit_sweep.csv", rows)
    try:
        assert main([f"--workdir={run_dir}", f"--out={tmp_path}"]) == 0
    finally:
        (run_dir / "exit_sweep.csv").unlink()
    drawn = read_csv(tmp_path / "exit_tradeoff.csv")
    assert [(r["exit_block"], r["threshold"]) for r in drawn] == [
        (str(r["exit_block"]), str(r["threshold"])) for r in rows
    ]


def test_pareto_front_keeps_only_undominated_points():
    rows = [
        {"math_score": 1.0, "accuracy": 0.5},
        {"math_score": 2.0, "accuracy": 0.4},  # dominated by the first
        {"math_score": 3.0, "accuracy": 0.7},
        {"math_score": 1.0, "accuracy": 0.6},  # dominates the first
    ]
    front = plots.pareto_front(rows)
    assert [(r["math_score"], r["accuracy"]) for r in front] == [(1.0, 0.6), (3.0, 0.7)]


def test_curve_rows_put_stages_on_one_axis():
    stages = [("stage_a", [{"epoch": 1}, {"epoch": 2}]), ("prune_01", [{"epoch": 1}])]
    rows = plots.curve_rows(stages)
    assert [(r["stage"], r["epoch"], r["stage_epoch"]) for r in rows] == [
        ("stage_a", 1, 1),
        ("stage_a", 2, 2),
        ("prune_01", 3, 1),
    ]


def test_cli_rejects_a_missing_workdir(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main([f"--workdir={tmp_path / 'absent'}"])
    assert exc.value.code == 2


def test_an_unfinished_run_gets_the_plots_it_can_have(tmp_path):
    """Stage A done, nothing else: curves and accuracy vs sparsity, no error."""
    stage = tmp_path / "stage_a"
    stage.mkdir()
    records = [
        {
            "epoch": e,
            "train_loss": 3.0 - e,
            "train_accuracy": 0.1 * e,
            "test_loss": 3.1 - e,
            "test_accuracy": 0.1 * e,
        }
        for e in (1, 2)
    ]
    (stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    done = {"stage": "stage_a", "epochs": 2, "target": None, "sparsity": 0.0, "final": records[-1]}
    (stage / "done.json").write_text(json.dumps(done))
    assert main([f"--workdir={tmp_path}"]) == 0
    written = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert written == [
        "accuracy_vs_sparsity.csv",
        "accuracy_vs_sparsity.png",
        "training_curves.csv",
        "training_curves.png",
    ]
    (row,) = read_csv(tmp_path / "plots" / "accuracy_vs_sparsity.csv")
    assert float(row["test_accuracy"]) == pytest.approx(0.2)


def test_a_run_in_progress_with_a_half_written_metrics_line_is_reported(tmp_path):
    """A run being written to ends its metrics.jsonl in a partial line: the report plots
    the complete records and leaves that line out, as a resume does. (Control: the same
    file through a plain JSON-lines read raises.)"""
    stage = tmp_path / "stage_a"
    stage.mkdir()
    records = [{"epoch": e, "train_loss": 3.0 - e, "test_accuracy": 0.1 * e} for e in (1, 2)]
    text = "".join(json.dumps(r) + "\n" for r in records) + '{"epoch": 3, "train_lo'
    (stage / "metrics.jsonl").write_text(text)
    with pytest.raises(json.JSONDecodeError):
        [json.loads(line) for line in text.splitlines()]
    assert main([f"--workdir={tmp_path}"]) == 0
    rows = read_csv(tmp_path / "plots" / "training_curves.csv")
    assert [int(float(r["epoch"])) for r in rows] == [1, 2]


def test_a_run_recorded_before_a_key_existed_reads_it_as_its_default(tmp_path):
    from micronet_jax.config.defaults import default_config

    recorded = json.loads(default_config().to_json())
    recorded["train"]["lr"] = 0.5
    recorded["model"]["block_strings"] = ["r1_k3_s1_e1_i8_o8_se0.25"]
    del recorded["quant"]["depthwise_channels"]
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    config = load_run_config(tmp_path)
    assert config.train.lr == 0.5 and config.model.block_strings == ("r1_k3_s1_e1_i8_o8_se0.25",)
    assert config.quant.depthwise_channels is True
    assert load_run_config(tmp_path / "nothing") is None
