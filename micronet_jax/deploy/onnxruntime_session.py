"""One way to open an ONNX file in onnxruntime, for the export, the benchmarks and the
experiments: the CPU provider, thread counts when asked, profiling when asked."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def session(
    path: str | Path, threads: int = 0, inter_op_threads: int = 0, profile: bool = False
) -> Any:
    """An onnxruntime InferenceSession of `path` on the CPU (0 threads: its default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if inter_op_threads:
        options.inter_op_num_threads = inter_op_threads
    options.enable_profiling = profile
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def file_sha256(paths: Path | Sequence[Path]) -> str:
    """The sha256 of a file, or of several files' bytes in path order (a workdir's stage):
    what an export's card records of its source."""
    digest = hashlib.sha256()
    for path in sorted([paths] if isinstance(paths, (str, Path)) else paths):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
