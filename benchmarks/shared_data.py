"""Where the benchmarks and experiments find the real data and the original's checkpoints:
the `shared/` folder beside the repository (or `$MICRONET_SHARED`), as the tests do."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MICRONET_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"
CIFAR10_ARCHIVE = DATA / "cifar-10-python.tar.gz"
REFERENCE = SHARED / "reference" / "osi_ai"


def checkpoint(name: str = "final_ee50") -> Path:
    """The original's released checkpoint `name` (final_ee50 or first_submission)."""
    return REFERENCE / name / "trained_model.pth"
