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
