"""Orbax checkpoints of a training state plus a JSON record, written atomically.

Orbax writes each step into a temporary directory and renames it when complete, so a
half-written checkpoint is never listed. A damaged latest checkpoint falls back to the
previous good one with a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from micronet_jax.errors import CheckpointError

log = logging.getLogger(__name__)


class Checkpointer:
    """Keeps the latest `keep` checkpoints of one stage under `directory`."""

    def __init__(self, directory: str | Path, keep: int = 3):
        self.directory = Path(directory).absolute()
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
            return restored["state"], dict(restored["meta"]), candidate
        raise CheckpointError(
            f"no readable checkpoint in {self.directory}; found: " + "; ".join(problems)
        )

    def close(self) -> None:
        self.manager.close()
