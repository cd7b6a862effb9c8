"""`python -m benchmarks.device_check --smoke`: every part runs at tiny sizes on this CPU and
lands in the JSON and the Markdown block, so that a session lent a GPU can run the real one
at once and trust it to finish."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_run import with_fast_compile

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("environment", "checks", "train_steps", "epoch", "learning", "inference")


@pytest.mark.slow
def test_smoke_run_writes_every_part(tmp_path, compile_cache):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.device_check", "--smoke", "--out", str(tmp_path),
         "--payload", str(tmp_path / "no_payload")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "JAX_PLATFORMS": "cpu",
             "MICRONET_CACHE_DIR": str(compile_cache), "PYTHONPATH": str(ROOT),
             "XLA_FLAGS": with_fast_compile("")},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (result,) = tmp_path.glob("*-smoke.json")
    data = json.loads(result.read_text())
    assert "errors" not in data, data["errors"]
    for part in PARTS:
        assert isinstance(data.get(part), dict) and "skipped" not in data[part], part
    assert data["total_seconds"] > 0
    env = data["environment"]
    assert env["backend"] == "cpu" and env["device_count"] >= 1 and env["jax"]
    checks = data["checks"]
    assert checks["lowering_agreement"]["ok"]
    assert checks["checkpoint_parity"]["skipped"].startswith("no payload")
    assert checks["bf16"]["grads_finite"]
    train = data["train_steps"]
    assert {(r["dtype"], r["k"]) for r in train["rows"]} >= {("float32", 1), ("bfloat16", 1)}
    assert all(r["images_per_s"] > 0 and r["compile_s"] > 0 for r in train["rows"])
    assert train["best_k"] in (1, 4)
    assert data["epoch"]["projected_recipe_hours"] > 0
    assert 0 <= data["learning"]["test_accuracy"] <= 1
    assert [r["batch"] for r in data["inference"]["rows"]] == [64]
    markdown = (tmp_path / result.name.replace(".json", ".md")).read_text()
    for piece in ("### Device check", "| dtype | batch | K |", "Epoch of", "Early exit"):
        assert piece in markdown, piece
