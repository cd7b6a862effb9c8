"""Shared test fixtures: where ../shared lives, and what happens when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MICRONET_SHARED", REPO.parent / "shared"))
REQUIRE_SHARED = os.environ.get("MICRONET_REQUIRE_SHARED") == "1"


def _shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        message = f"{path} is absent (tests that need real data or checkpoints use ../shared)"
        if REQUIRE_SHARED:
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def cifar10_archive() -> Path:
    """The real CIFAR-10 archive in ../shared/data."""
    return _shared_path("data", "cifar-10-python.tar.gz")


@pytest.fixture(scope="session")
def original_checkpoints() -> Path:
    """The original's released checkpoints in ../shared/reference/osi_ai."""
    return _shared_path("reference", "osi_ai")


def pytest_configure(config) -> None:
    """Every program the tests compile goes to the persistent compilation cache the runs use
    (`$MICRONET_CACHE_DIR`, default ~/.cache/micronet_jax/xla): compiled once per session, and
    on a working machine once until the code changes. CI points it at an empty folder."""
    from micronet_jax.runtime import enable_compilation_cache

    enable_compilation_cache()


@pytest.fixture(scope="session")
def compile_cache() -> Path:
    """That cache's folder, for the runs the tests start on the command line."""
    from micronet_jax.runtime import default_cache_dir

    return default_cache_dir()


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory) -> Path:
    """A generated CIFAR-10 archive in the standard layout, sized for the tiny network's runs
    (160 training and 32 test images). Runs only read it."""
    from archives import make_cifar10_python_archive

    path = tmp_path_factory.mktemp("data") / "cifar-10-python.tar.gz"
    make_cifar10_python_archive(path, n_train=160, n_test=32)
    return path


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, tiny_archive, compile_cache):
    """A finished run of `tests/configs/tiny.py:pipeline` on `tiny_archive`:
    (config, workdir, report). The pipeline and report tests share it; they read it, add
    plots beside it, or rerun it (which changes no stage)."""
    from tiny_run import tiny_config

    from micronet_jax.pipeline import run_pipeline

    config = tiny_config("pipeline")
    config.data.dir = str(tiny_archive)
    workdir = tmp_path_factory.mktemp("pipeline") / "run"
    return config, workdir, run_pipeline(config, workdir)
