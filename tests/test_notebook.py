"""The Colab notebook end to end on a CPU: tiny config, a generated archive, no installs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from archives import make_cifar100_python_archive

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "experiments" / "colab.ipynb"
ORIGINAL = (
    Path(os.environ.get("MICRONET_SHARED", REPO.parent / "shared"))
    / "reference"
    / "osi_ai"
    / "first_submission"
    / "trained_model.pth"
)


def outputs(nb, output_type: str) -> list:
    return [
        o
        for cell in nb.cells
        if cell.cell_type == "code"
        for o in cell.outputs
        if o.output_type == output_type
    ]


@pytest.mark.slow
def test_notebook_runs_end_to_end(tmp_path, monkeypatch, compile_cache):
    if not ORIGINAL.exists() and os.environ.get("MICRONET_REQUIRE_SHARED") == "1":
        pytest.fail(f"{ORIGINAL} is absent: the notebook's checkpoint cell would not be run")
    archive = tmp_path / "cifar-100-python.tar.gz"
    make_cifar100_python_archive(archive, n_train=96, n_test=32)
    workdir = tmp_path / "run"
    env = {
        "MICRONET_NOTEBOOK_INSTALL": "0",
        "MICRONET_NOTEBOOK_DATA": str(archive),
        "MICRONET_NOTEBOOK_WORKDIR": str(workdir),
        "MICRONET_NOTEBOOK_TINY": "1",
        "MICRONET_NOTEBOOK_CHECKPOINT": str(ORIGINAL) if ORIGINAL.exists() else "",
        "MICRONET_CACHE_DIR": str(compile_cache),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    text = "".join(o.get("text", "") for o in outputs(nb, "stream"))
    assert "install skipped" in text
    assert f"read from {archive}" in text
    assert (workdir / "report.json").exists() and (workdir / "exit" / "done.json").exists()
    images = [o for o in outputs(nb, "display_data") if "image/png" in o.get("data", {})]
    pngs = sorted((workdir / "plots").glob("*.png"))
    assert len(images) == len(pngs) >= 5
    if ORIGINAL.exists():
        assert "MicroNet score" in text  # run_test printed the original's report


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize("file_format", ["tfrecord", "array_record"])
def test_the_data_cell_reads_tfds_prepared_either_way(file_format, prepared_tfds, monkeypatch):
    """On Colab the notebook prefers TFDS (installed there): its data cell reads a CIFAR-10
    that TFDS prepared as TFRecord or as array_record, and says which it read."""
    monkeypatch.setenv("MICRONET_NOTEBOOK_INSTALL", "0")
    monkeypatch.setenv("MICRONET_NOTEBOOK_DATA", "")
    monkeypatch.setenv("MICRONET_NOTEBOOK_DATASET", "cifar10")
    monkeypatch.setenv("TFDS_DATA_DIR", str(prepared_tfds / file_format))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    setup, data = (
        next(c for c in nb.cells if c.cell_type == "code" and marker in "".join(c.source))
        for marker in ("MICRONET_NOTEBOOK_DATASET", "load_train_test")
    )
    nb.cells = [setup, data]
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    )
    client.execute()
    text = "".join(o.get("text", "") for o in outputs(nb, "stream"))
    assert f"cifar10 read from TFDS ({file_format}) " in text
    assert "200 train / 100 test images" in text
