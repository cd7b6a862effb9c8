"""The lines a run prints before its first step: where it runs, on what, and what it will do.

A run of the recipe lasts days; a user should see at once which device it found, which
data it read (and from where), how large the model is, how many stages, epochs and steps
lie ahead, and whether it starts afresh or resumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from micronet_jax.data.cifar import CifarSplit
from micronet_jax.models.architecture import Architecture
from micronet_jax.recipe.stages import DONE_FILE, StageSpec, read_summary
from micronet_jax.scoring.counter import count_micronet


def _count(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,.0f}"


def device_line() -> str:
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    where = f"{len(devices)} × {', '.join(kinds)} ({jax.default_backend()})"
    if jax.process_count() > 1:
        where += f" over {jax.process_count()} processes"
    return f"devices: {where}; jax {jax.__version__}"


def data_line(name: str, train: CifarSplit | None, test: CifarSplit) -> str:
    sizes = f"{len(test):,} test images"
    if train is not None:
        sizes = f"{len(train):,} train / " + sizes
    source = test.source or "memory"
    return f"data: {name} from {source}: {sizes}, {test.num_classes} classes"


def model_line(arch: Architecture) -> str:
    """Parameters and dense math ops per image, counted by the MicroNet rules."""
    main = count_micronet(arch.with_exit_head(None))
    text = (
        f"model: {main.params:,.0f} parameters, {_count(main.math_ops)} dense math ops per "
        f"image ({_count(main.mults)} mults + {_count(main.adds)} adds)"
    )
    if arch.exit_head is not None:
        head = count_micronet(arch).layer("exit_head")
        text += (
            f"; exit head after block {arch.exit_head.after_block}: "
            f"{head.params:,.0f} parameters, {_count(head.math_ops)} ops"
        )
    return text


STAGE_LABELS = {
    "baseline": "baseline",
    "prune": "pruning round",
    "exit": "exit head",
    "exit_prune": "exit pruning round",
    "quantize": "quantisation-aware training",
}


def plan_line(stages: list[StageSpec], steps_per_epoch: int, batch_size: int, k: int) -> str:
    kinds: dict[str, list[StageSpec]] = {}
    for stage in stages:
        kinds.setdefault(stage.kind, []).append(stage)
    parts = []
    for kind, group in kinds.items():
        epochs = sorted({s.epochs for s in group})
        each = f"{epochs[0]}" if len(epochs) == 1 else f"{epochs[0]}-{epochs[-1]}"
        label = STAGE_LABELS.get(kind, kind)
        count = f"{len(group)} {label}s" if len(group) > 1 else label
        targets = [s.target for s in group if s.target is not None]
        to = f" to {targets[-1]:g}%" if targets else ""
        parts.append(f"{count} × {each} epochs{to}" if len(group) > 1 else f"{count} {each}")
    epochs = sum(s.epochs for s in stages)
    steps = epochs * steps_per_epoch
    dispatch = f", {k} steps per dispatch" if k > 1 else ""
    return (
        f"plan: {len(stages)} stage{'s' if len(stages) > 1 else ''} ({'; '.join(parts)}) = "
        f"{epochs:,} epochs, {steps:,} steps of batch {batch_size} "
        f"({steps_per_epoch} per epoch{dispatch})"
    )


def latest_checkpoint_step(stage_dir: Path) -> int | None:
    """The newest complete checkpoint step of a stage (orbax's finished step folders)."""
    folder = stage_dir / "checkpoints"
    steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
    return max(steps) if steps else None


def workdir_line(workdir: Path, stages: list[StageSpec], steps_per_epoch: int) -> str:
    """New, or what is resumed: finished stages and the checkpoint the next one starts from."""
    done = [s for s in stages if (workdir / s.name / DONE_FILE).exists()]
    if len(done) == len(stages):
        return f"workdir: {workdir} (every stage finished: only the report is redone)"
    following = stages[len(done)]
    step = latest_checkpoint_step(workdir / following.name)
    if not done and step is None:
        return f"workdir: {workdir} (new run)"
    parts = [f"{len(done)} of {len(stages)} stages finished"] if done else []
    if step is not None:
        epoch = step / steps_per_epoch
        parts.append(
            f"{following.name} resumes at step {step:,} (epoch {epoch:.4g} of {following.epochs})"
        )
    else:
        parts.append(f"{following.name} starts")
    return f"workdir: {workdir} (resuming: {'; '.join(parts)})"


def finished_stage_line(position: str, stage: StageSpec, workdir: Path) -> str:
    """A stage finished by an earlier run: its result, from done.json."""
    return f"{position} {stage.name}: finished earlier; " + stage_result(
        read_summary(workdir, stage)
    )


def stage_result(summary: dict[str, Any]) -> str:
    """'test accuracy 0.5612, exit ratio 0.3100, sparsity 20.00%' from a stage summary."""
    final = summary.get("final") or {}
    parts = []
    if final.get("test_accuracy") is not None:
        parts.append(f"test accuracy {final['test_accuracy']:.4f}")
    if final.get("test_exit_ratio") is not None:
        parts.append(f"exit ratio {final['test_exit_ratio']:.4f}")
    if final.get("test_combined_agreement") is not None:
        parts.append(f"agreement with float32 {final['test_combined_agreement']:.4f}")
    parts.append(f"sparsity {summary['sparsity']:.2%}")
    if summary.get("exit_sparsity"):
        parts.append(f"exit-head sparsity {summary['exit_sparsity']:.2%}")
    return ", ".join(parts)
