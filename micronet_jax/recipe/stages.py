"""The recipe's stages and where a run keeps them.

A pipeline workdir holds one folder per stage (`stage_a/`, `prune_01/` … `prune_NN/`,
`exit/`, `exit_prune_01/` …). A finished stage has its final variables and masks in
`final/` and its summary in `done.json`. The pipeline writes these; the report, the
test mode, experiments and notebooks read them back through this module, so none of
them needs the pipeline itself.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from micronet_jax.config import builders
from micronet_jax.errors import CheckpointError, ConfigError
from micronet_jax.evaluation.early_exit import check_threshold
from micronet_jax.models.efficientnet import init_variables
from micronet_jax.models.paths import path_name
from micronet_jax.quant.fake import is_weight, scale_key
from micronet_jax.quant.widths import INTEGER_BELOW
from micronet_jax.train import pruning
from micronet_jax.train.checkpoint import Checkpointer

EXIT_KINDS = ("exit", "exit_prune", "quantize")  # the stages whose network has an exit head
DONE_FILE = "done.json"
FINAL_DIR = "final"


@dataclasses.dataclass(frozen=True)
class StageSpec:
    name: str  # stage_a, prune_01, ..., exit, exit_prune_01, ..., quantize
    kind: str  # baseline | prune | exit | exit_prune | quantize
    epochs: int
    target: float | None = None  # cumulative sparsity (percent) of a pruning round

    @property
    def has_exit_head(self) -> bool:
        return self.kind in EXIT_KINDS


def scaled_epochs(epochs: int, scale: float) -> int:
    return max(1, round(epochs * scale))


def plan_stages(config: Any) -> list[StageSpec]:
    """The stages `config.pipeline` asks for, in order."""
    p = config.pipeline
    if p.epoch_scale <= 0:
        raise ConfigError(f"pipeline.epoch_scale must be positive, got {p.epoch_scale}")
    prune_targets = pruning.validate_targets(p.prune_targets)
    exit_targets = pruning.validate_targets(p.exit_prune_targets)
    check_threshold(p.threshold)
    s = p.epoch_scale
    stages = [StageSpec("stage_a", "baseline", scaled_epochs(p.baseline_epochs, s))]
    for i, target in enumerate(prune_targets, 1):
        stages.append(
            StageSpec(f"prune_{i:02d}", "prune", scaled_epochs(p.prune_epochs, s), target)
        )
    stages.append(StageSpec("exit", "exit", scaled_epochs(p.exit_epochs, s)))
    for i, target in enumerate(exit_targets, 1):
        stages.append(
            StageSpec(
                f"exit_prune_{i:02d}", "exit_prune", scaled_epochs(p.exit_prune_epochs, s), target
            )
        )
    if builders.bit_widths_of(config).quantised:
        stages.append(quantize_stage(config))
    return stages


def quantize_stage(config: Any) -> StageSpec:
    """The quantisation-aware stage (the last of a pipeline, or alone in mode=quantize)."""
    return StageSpec(
        "quantize", "quantize", scaled_epochs(config.quant.epochs, config.pipeline.epoch_scale)
    )


def is_done(workdir: str | Path, stage: StageSpec) -> bool:
    return (Path(workdir) / stage.name / DONE_FILE).exists()


def read_summary(workdir: str | Path, stage: StageSpec) -> dict[str, Any]:
    """A finished stage's `done.json`."""
    return json.loads((Path(workdir) / stage.name / DONE_FILE).read_text())


def _stage_key(name: str) -> tuple[int, str]:
    """stage_a, prune_01 … prune_NN, exit, exit_prune_01 …: the order the recipe runs them."""
    if name == "stage_a":
        return 0, name
    if name.startswith("prune_"):
        return 1, name
    if name == "exit":
        return 2, name
    return 3, name


def stage_dirs(workdir: str | Path) -> list[Path]:
    """Stage folders of a run (those with metrics or a done.json), in recipe order."""
    found = {
        p.parent
        for pattern in (f"*/{DONE_FILE}", "*/metrics.jsonl")
        for p in Path(workdir).glob(pattern)
        if not p.parent.name.startswith(".")
    }
    return sorted(found, key=lambda p: _stage_key(p.name))


def _final_template(config: Any, stage: StageSpec) -> dict:
    arch = builders.architecture_from_config(config, with_exit=stage.has_exit_head)
    model = builders.model_from_config(config, arch)
    variables = jax.eval_shape(functools.partial(init_variables, model), jax.random.key(0))
    template = {**variables, "masks": variables["params"]}
    if stage.kind == "quantize":
        template["quant"] = activation_ranges_template(variables["params"], config)
    return template


def activation_ranges_template(params: Any, config: Any) -> dict:
    """The shapes of a quantised network's activation ranges: (low, high) per layer whose
    input is on an integer grid, (2, channels) where it has a grid per channel."""
    bits = builders.bit_widths_of(config)

    def shape(path: str, kernel: Any) -> tuple[int, ...]:
        channels = np.shape(kernel)[-1]  # a depthwise kernel's: its input channels
        return (2, channels) if bits.input_grids(path, channels) > 1 else (2,)

    return {
        scale_key(path): jax.ShapeDtypeStruct(shape(path, leaf), jnp.float32)
        for path, leaf in param_paths(params)
        if is_weight(path, leaf) and bits.of(path)[1] < INTEGER_BELOW
    }


def param_paths(params: Any) -> list[tuple[str, Any]]:
    return [(path_name(k), leaf) for k, leaf in jax.tree_util.tree_leaves_with_path(params)]


def save_final(
    stage_dir: Path, variables: dict, masks: Any, summary: dict, write_summary: bool = True
) -> None:
    """`final` then done.json; a `final` left by a run killed before done.json is redone.

    Every process of a multi-host job calls this (orbax writes each array once); only the
    one with `write_summary` touches the other files.
    """
    if write_summary and (stage_dir / FINAL_DIR).exists():
        shutil.rmtree(stage_dir / FINAL_DIR)
    ckpt = Checkpointer(stage_dir / FINAL_DIR, keep=1)
    ckpt.save(0, {**variables, "masks": masks}, summary)
    ckpt.close()
    if not write_summary:
        return
    tmp = stage_dir / (DONE_FILE + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True))
    os.replace(tmp, stage_dir / DONE_FILE)


def load_final(config: Any, stage: StageSpec, stage_dir: str | Path) -> tuple[dict, Any]:
    """A finished stage's final (variables, masks)."""
    ckpt = Checkpointer(Path(stage_dir) / FINAL_DIR, keep=1)
    try:
        tree, _, _ = ckpt.restore(_final_template(config, stage))
    finally:
        ckpt.close()
    masks = tree.pop("masks")
    return tree, masks


def last_exit_stage(config: Any, workdir: str | Path) -> StageSpec:
    """The run's last finished stage with an exit head (the one a report evaluates)."""
    plan = [quantize_stage(config)] if config.mode == "quantize" else plan_stages(config)
    finished = [s for s in plan if is_done(workdir, s)]
    if not finished or not finished[-1].has_exit_head:
        raise CheckpointError(
            f"{workdir} holds no finished exit stage (found: {[s.name for s in finished]})"
        )
    return finished[-1]
