"""Orbax checkpoints of a training state plus a JSON record, written atomically.

Orbax writes each step into a temporary directory and renames it when complete, so a
half-written checkpoint is never listed. A damaged latest checkpoint falls back to the
previous good one with a warning; the unreadable one is moved to `<directory>.damaged/`.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from micronet_jax.errors import CheckpointError

log = logging.getLogger(__name__)


MB = 1 << 20


def tree_size(path: Path) -> int:
    """Bytes of the files under `path` (0 when it does not exist)."""
    if not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def check_free_space(directory: Path, last_size: int, min_free_bytes: int) -> None:
    """Refuse to start a checkpoint that may not fit: a half-written one is useless and a
    full disk can break the good ones' neighbours (metrics, reports)."""
    probe = directory
    while not probe.exists():
        probe = probe.parent
    need = max(3 * last_size, min_free_bytes)
    free = shutil.disk_usage(probe).free
    if free < need:
        raise CheckpointError(
            f"only {free / MB:.1f} MB free on the disk of {directory}; a checkpoint needs "
            f"{need / MB:.1f} MB (3x the last one, at least train.min_free_mb); free some "
            "space and rerun the same command to resume from the last checkpoint"
        )


class Checkpointer:
    """Keeps the latest `keep` checkpoints of one stage under `directory`."""

    def __init__(self, directory: str | Path, keep: int = 3, min_free_mb: float = 50):
        self.directory = Path(directory).absolute()
        self.min_free_bytes = int(min_free_mb * MB)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def save(self, step: int, state: Any, meta: dict) -> None:
        latest = self.latest_step()
        last = tree_size(self.directory / str(latest)) if latest is not None else 0
        check_free_space(self.directory, last, self.min_free_bytes)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """Restore (state, meta, step): the given step, or the newest one that reads back."""
        candidates = [step] if step is not None else list(reversed(self.steps()))
        if not candidates:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
        problems = []
        for candidate in candidates:
            try:
                restored = self.manager.restore(
                    candidate,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                    ),
                )
            except Exception as exc:  # noqa: BLE001 - any read failure means "damaged"
                problems.append(f"step {candidate}: {type(exc).__name__}: {exc}"[:300])
                log.warning(
                    "checkpoint %s/%s is unreadable, trying an older one: %s",
                    self.directory,
                    candidate,
                    exc,
                )
                continue
            if problems and step is None:
                self._set_aside(c for c in candidates if c > candidate)
            return restored["state"], dict(restored["meta"]), candidate
        raise CheckpointError(
            f"no readable checkpoint in {self.directory}; found: " + "; ".join(problems)
        )

    def _set_aside(self, steps: Any) -> None:
        """Move unreadable newer steps out of the way (to `<directory>.damaged/`), so the
        resumed run can write those steps again; the files are kept for inspection."""
        aside = self.directory.with_name(self.directory.name + ".damaged")
        for step in steps:
            source = self.directory / str(step)
            target = aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
            aside.mkdir(exist_ok=True)
            shutil.move(str(source), target)
            log.warning("moved the unreadable checkpoint %s to %s", source, target)
        self.manager.reload()

    def close(self) -> None:
        self.manager.close()
