"""JSON-lines metrics: one line per record, appended in a single write.

A single `os.write` on an O_APPEND descriptor never interleaves and, if the process is
killed, leaves at most one torn final line, which the reader skips.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def append_record(path: str | Path, record: dict[str, Any]) -> None:
    line = json.dumps({k: _jsonable(v) for k, v in record.items()}, sort_keys=True) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every complete record; a torn last line (from a kill mid-write) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_after(path: str | Path, key: str, value: int) -> None:
    """Drop records with record[key] > value (work done after the checkpoint resumed from)."""
    path = Path(path)
    if not path.exists():
        return
    kept = [r for r in read_records(path) if r.get(key, 0) <= value]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    os.replace(tmp, path)


# --- TensorBoard ----------------------------------------------------------------------------

NOT_SCALARS = frozenset({"epoch", "step", "wall_time"})


def scalar_name(key: str) -> str:
    """'train_loss' -> 'train/loss', 'test_exit_ratio' -> 'test/exit_ratio'; others unchanged,
    so TensorBoard groups the train and test curves."""
    for prefix in ("train_", "test_"):
        if key.startswith(prefix):
            return prefix[:-1] + "/" + key[len(prefix) :]
    return key


class ScalarWriter:
    """TensorBoard event files of a stage's epoch records, beside its metrics.jsonl.

    Written with tensorboardX (no TensorFlow needed). Epochs after `resume_epoch` that an
    earlier, interrupted run had logged are purged, as metrics.jsonl is truncated. Without
    tensorboardX installed it writes nothing and says so once.
    """

    _warned = False

    def __init__(self, directory: str | Path, resume_epoch: int = 0):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            if not ScalarWriter._warned:
                print("tensorboardX is not installed: no TensorBoard scalars are written")
                ScalarWriter._warned = True
            self._writer = None
            return
        purge = resume_epoch + 1 if resume_epoch else None
        self._writer = SummaryWriter(logdir=str(directory), purge_step=purge, flush_secs=30)

    def write(self, record: dict[str, Any], epoch: int) -> None:
        if self._writer is None:
            return
        for key, value in record.items():
            if key in NOT_SCALARS or isinstance(value, bool) or value is None:
                continue
            if isinstance(value, int | float):
                self._writer.add_scalar(scalar_name(key), float(value), epoch)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
