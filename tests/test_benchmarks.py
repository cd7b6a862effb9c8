"""Every benchmark runs, at a tiny size, from the command line a user types.

The benchmarks' figures are in benchmarks/RESULTS.md, measured at full size; these runs only
show that each script still works against today's package (its imports, flags, data and
checkpoint paths), and check what each one checks of itself: the fast early exit's
predictions equal the exact path's, the cleaned ONNX graph computes the raw one's logits,
the payload's archive loads through the project's loader. (benchmarks.deploy,
device_check and kill_resume have their own tests; deploy_profile runs in the export test
on the released network's files.)
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_run import REPO, main_env


def benchmark(name: str, *args: str, cache: Path, shared: Path | None, timeout: int = 600) -> str:
    """stdout of `python -m benchmarks.<name> args`, after checking it succeeded."""
    env = main_env(cache)
    env["MICRONET_SHARED"] = str(shared or REPO / "absent")
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def shared(original_checkpoints, cifar10_archive) -> Path:
    """../shared, as the benchmarks find it (real CIFAR-10 and the released checkpoints)."""
    return cifar10_archive.parents[1]


@pytest.fixture
def run(shared, compile_cache):
    """`benchmark` with ../shared and the suite's compilation cache."""
    return lambda name, *args: benchmark(name, *args, cache=compile_cache, shared=shared)


def number(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in:\n{text}"
    return float(found.group(1).replace(",", ""))


@pytest.mark.shared
def test_augment_times_jax_against_pil(run):
    out = run("augment", "--batch", "8", "--batches", "1", "--repeats", "1")
    assert number(r"ratio JAX / PIL\s+([\d.]+)x", out) > 0


@pytest.mark.shared
def test_early_exit_compares_the_fast_path_with_the_full_network(run):
    """The script asserts that the fast path's predictions are the exact path's."""
    out = run("early_exit", "--batch", "32", "--images", "64", "--repeats", "1")
    assert "original first-submission checkpoint" in out
    number(r"time saved: measured (-?[\d.]+)%", out)


@pytest.mark.shared
def test_onnx_graphs_cleaned_graph_computes_the_raw_one(run):
    out = run("onnx_graphs", "--batch", "4", "--repeats", "1")
    assert number(r"largest logit difference between the two graphs: ([\d.e+-]+)", out) < 1e-4
    assert re.search(r"\| onnxruntime \| clean \| \d+ \|", out)


@pytest.mark.shared
def test_device_payload_writes_what_the_device_check_reads(run, shared, tmp_path):
    from micronet_jax import load_train_test

    out_dir = tmp_path / "payload"
    run("device_payload", "--out", str(out_dir), "--wheels")
    train, test = load_train_test("cifar10", str(out_dir / "cifar-10-python.tar.gz"))
    _, real_test = load_train_test("cifar10", str(shared / "data" / "cifar-10-python.tar.gz"))
    assert len(train) == 10_000 and len(test) == 2_000
    np.testing.assert_array_equal(test.images, real_test.images[:2_000])
    logits = np.load(out_dir / "reference" / "logits.npz")
    assert len(logits.files) >= 2 and all(np.isfinite(logits[k]).all() for k in logits.files)
    assert sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file()) < 64 * 2**20


@pytest.mark.slow
@pytest.mark.shared
def test_blocks_and_train_step_time_jax_against_torch(run):
    out = run("blocks", "0", "--batch", "4", "--repeats", "1")
    assert number(r"sum: JAX .* torch/JAX ([\d.]+)", out) > 0
    out = run("train_step", "--batch", "4", "--steps", "1", "--warmup", "1", "--no_memory")
    assert number(r"JAX/torch throughput ratio: ([\d.]+)x", out) > 0


@pytest.mark.slow
@pytest.mark.shared
def test_epoch_measures_the_share_outside_the_step(run):
    out = run("epoch", "--model", "tiny", "--num_images", "64", "--batch", "16", "--repeats", "1")
    assert 0 <= number(r"non-step share of the epoch: (-?[\d.]+)%", out) < 100


@pytest.mark.slow
@pytest.mark.shared
def test_learning_check_runs_both_frameworks_on_the_same_images(run):
    import json

    out = run("learning_check", "--num_train", "64", "--num_test", "64", "--epochs", "1")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["framework"] for r in rows] == ["jax", "torch"]
    for row in rows:
        assert row["num_test"] == 64 and 0 <= row["test_accuracy"] <= 1
        assert len(row["train_loss"]) == 1 and np.isfinite(row["train_loss"][0])


def test_every_benchmark_is_run_by_a_test():
    """A benchmark no test runs is a script that rots: each is named in a test."""
    tests = "\n".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    helpers = {"__init__", "shared_data", "torch_micronet"}
    scripts = {p.stem for p in (REPO / "benchmarks").glob("*.py")} - helpers
    assert len(scripts) >= 8

    def runs(script: str) -> bool:
        named = (
            rf"benchmarks[./]{script}\b",  # python -m benchmarks.x, benchmarks/x.py
            rf'(?:run|benchmark)\(\s*"{script}"',  # this file's runners
            rf"from benchmarks import [^\n]*\b{script}\b",
        )
        return any(re.search(pattern, tests) for pattern in named)

    untested = sorted(s for s in scripts if not runs(s))
    assert untested == [], f"benchmarks no test runs: {untested}"


@pytest.mark.slow
def test_compile_cache_times_a_fresh_and_a_cached_start(compile_cache):
    out = benchmark("compile_cache", "--model", "smoke", "--batch", "8", cache=compile_cache,
                    shared=None)  # fmt: skip
    first = number(r"first start \(empty cache\)\s*:\s*([\d.]+) s", out)
    second = number(r"second start \(cached\)\s*:\s*([\d.]+) s", out)
    assert first > 0 and second > 0
