"""A workdir written by an earlier version of the package still resumes and is scored.

`tests/data/workdir_v0_1/` is what `python -m micronet_jax.main` of micronet_jax 0.1 (the
flat package layout, before the subpackages) left after the tiny pipeline was stopped in its
exit stage: stage_a, prune_01 and prune_02 finished, the exit stage's last checkpoint on
disk, exit_prune_01 not begun. `workdir_v0_1_uninterrupted_report.json` is the report the
same version wrote for the same pipeline run without a stop. The archive is the tests' tiny
one (`tiny_archive`, the same generated data).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tiny_run import TINY, main_env, run_main

DATA = Path(__file__).resolve().parent / "data"
OLD_WORKDIR = DATA / "workdir_v0_1"
UNINTERRUPTED = DATA / "workdir_v0_1_uninterrupted_report.json"
FINISHED_EARLIER = ("stage_a", "prune_01", "prune_02")


@pytest.mark.slow
def test_a_workdir_of_the_flat_layout_resumes_and_is_scored(tmp_path, tiny_archive, compile_cache):
    workdir = tmp_path / "run"
    shutil.copytree(OLD_WORKDIR, workdir)
    before = {s: (workdir / s / "done.json").read_text() for s in FINISHED_EARLIER}

    done = run_main(workdir, tiny_archive, env=main_env(compile_cache), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming: 3 of 5 stages finished; exit resumes at step 5" in done.stdout
    for stage in FINISHED_EARLIER:  # read, not redone
        assert f"{stage}: finished earlier" in done.stdout
        assert (workdir / stage / "done.json").read_text() == before[stage]
    report = json.loads((workdir / "report.json").read_text())
    reference = json.loads(UNINTERRUPTED.read_text())
    assert report["layer_sparsity"] == reference["layer_sparsity"]
    assert report["metrics"] == pytest.approx(reference["metrics"])
    for counting in ("score_actual_masks", "score_published_convention"):
        assert report[counting]["score"] == pytest.approx(reference[counting]["score"], rel=1e-9)

    scored = run_main(
        tmp_path / "test",
        tiny_archive,
        "--config.mode=test",
        f"--config.checkpoint={workdir}",
        config=f"{TINY}:pipeline",
        env=main_env(compile_cache),
        timeout=600,
    )
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert f"checkpoint: {workdir}" in scored.stdout
    test_report = json.loads((tmp_path / "test" / "report.json").read_text())
    assert test_report["exit_sparsity"] == pytest.approx(0.5)  # exit_prune_01's masks
    assert test_report["score_actual_masks"] == report["score_actual_masks"]
