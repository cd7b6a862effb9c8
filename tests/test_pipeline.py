"""The multi-stage recipe on a tiny config: every stage kind, the report, skipping on rerun."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from tiny_run import tiny_config

from micronet_jax.errors import ConfigError
from micronet_jax.recipe.pipeline import run_pipeline
from micronet_jax.recipe.stages import plan_stages
from micronet_jax.train import pruning


def test_plan_follows_the_recipe():
    from micronet_jax.config.defaults import default_config

    config = default_config()
    stages = plan_stages(config)
    assert [s.name for s in stages][:2] == ["stage_a", "prune_01"]
    assert [s.target for s in stages if s.kind == "prune"] == list(pruning.DEFAULT_TARGETS)
    assert [s.epochs for s in stages] == [1200] + [600] * 11 + [800]
    assert stages[-1].kind == "exit"


def test_plan_rejects_bad_targets():
    config = tiny_config("pipeline")
    config.pipeline.prune_targets = (30.0, 20.0)
    with pytest.raises(ConfigError, match="increase"):
        plan_stages(config)
    config.pipeline.prune_targets = (30.0, 100.0)
    with pytest.raises(ConfigError, match=r"\[0, 100\)"):
        plan_stages(config)


def test_every_stage_finishes_with_its_sparsity(tiny_pipeline):
    _, workdir, _ = tiny_pipeline
    names = ["stage_a", "prune_01", "prune_02", "exit", "exit_prune_01"]
    for name in names:
        assert (workdir / name / "done.json").exists(), name
    summaries = {n: json.loads((workdir / n / "done.json").read_text()) for n in names}
    assert summaries["stage_a"]["sparsity"] == 0.0
    assert summaries["prune_01"]["sparsity"] == pytest.approx(0.30, abs=0.002)
    assert summaries["prune_02"]["sparsity"] == pytest.approx(0.60, abs=0.002)
    assert summaries["exit"]["exit_sparsity"] == 0.0
    assert summaries["exit_prune_01"]["exit_sparsity"] == pytest.approx(0.50, abs=0.002)
    # the exit-head stages leave the main network's weights alone
    assert summaries["exit_prune_01"]["sparsity"] == summaries["prune_02"]["sparsity"]


def test_report_is_written_and_consistent(tiny_pipeline):
    _, workdir, report = tiny_pipeline  # report: report.json as the run wrote it
    assert "MicroNet score" in (workdir / "report.md").read_text()
    m = report["metrics"]
    assert 0.0 <= m["exit_ratio"] <= 1.0
    assert 0.0 <= m["accuracy"] <= 1.0
    assert report["sparsity"] == pytest.approx(0.60, abs=0.002)
    honest, published = report["score_actual_masks"], report["score_published_convention"]
    assert honest["params"] == pytest.approx(published["params"], rel=0.01)
    assert honest["score"] > 0 and published["score"] > 0


def test_rerun_skips_finished_stages(tiny_pipeline, tiny_pipeline_copy):
    config, _, report = tiny_pipeline
    workdir = tiny_pipeline_copy
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("metrics.jsonl")}
    again = run_pipeline(config, workdir)
    after = {p: p.stat().st_mtime_ns for p in workdir.rglob("metrics.jsonl")}
    assert before == after  # no stage trained again
    assert again["metrics"] == report["metrics"]


def test_pruned_weights_are_zero_in_final_variables(tiny_pipeline):
    config, workdir, _ = tiny_pipeline
    from micronet_jax.recipe.stages import load_final, plan_stages

    stage = plan_stages(config)[-1]
    variables, masks = load_final(config, stage, workdir / stage.name)
    pruned = 0
    for w, m in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(masks), strict=True):
        w, m = np.asarray(w), np.asarray(m)
        assert np.all(w[m == 0] == 0)
        pruned += int(np.sum(m == 0))
    total = sum(np.size(m) for m in jax.tree.leaves(masks))
    assert pruned > 0.3 * total  # the masks do prune (60% of the main network's kernels)
