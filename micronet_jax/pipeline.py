"""The recipe as a list of stages: baseline -> pruning rounds -> exit head [-> exit pruning].

Each stage trains under `workdir/<stage>/` (its own checkpoints and metrics.jsonl) and, when
finished, saves its final variables and masks to `workdir/<stage>/final` plus `done.json`.
A rerun skips finished stages and resumes the unfinished one from its latest checkpoint.
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
import numpy as np

from micronet_jax import builders, pruning
from micronet_jax.errors import CheckpointError, ConfigError
from micronet_jax.inference import check_threshold, exit_metrics, exit_predict_exact
from micronet_jax.models.efficientnet import MicroNet, init_variables
from micronet_jax.report import build_report, report_markdown, write_report
from micronet_jax.train import sharding
from micronet_jax.train.checkpoint import Checkpointer
from micronet_jax.train.loop import DeviceData, Schedule, fit, guard_options, step_config_from
from micronet_jax.train.optim import lr_at_epoch, make_optimizer
from micronet_jax.train.state import (
    create_exit_state,
    create_train_state,
    full_variables,
    ones_masks,
    variables_of,
)
from micronet_jax.train.steps import evaluate, step_function
from micronet_jax.validate import check_resume, record_config


@dataclasses.dataclass(frozen=True)
class StageSpec:
    name: str  # stage_a, prune_01, ..., exit, exit_prune_01, ...
    kind: str  # baseline | prune | exit | exit_prune
    epochs: int
    target: float | None = None  # cumulative sparsity (percent) of a pruning round


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
    return stages


@dataclasses.dataclass
class Context:
    """What every stage shares: config, data on the device, and the two models."""

    config: Any
    train: DeviceData
    test_images: jax.Array
    test_labels: np.ndarray
    model: MicroNet  # main network only
    exit_model: MicroNet  # with the exit head
    mesh: Any = None  # a 'data' mesh when training data-parallel over several devices

    @classmethod
    def from_config(cls, config: Any) -> Context:
        train, test = builders.load_data(config)
        mesh = sharding.data_mesh(config.train.data_parallel)
        arch = builders.architecture_from_config(config)
        exit_arch = builders.architecture_from_config(config, with_exit=True)
        return cls(
            config=config,
            train=DeviceData.from_numpy(train.images, train.labels, mesh),
            test_images=jax.device_put(test.images),
            test_labels=np.asarray(test.labels),
            model=builders.model_from_config(config, arch),
            exit_model=builders.model_from_config(config, exit_arch),
            mesh=mesh,
        )

    def schedule(self, epochs: int) -> Schedule:
        t = self.config.train
        return Schedule(
            epochs=epochs,
            batch_size=t.batch_size,
            num_examples=len(self.train),
            drop_last=t.drop_last,
            batch_multiple=self.config.model.bn_splits,
            eval_every=t.eval_every,
            checkpoint_every=t.checkpoint_every,
        )


def _stage_seed(config: Any, index: int) -> int:
    return int(config.seed) * 1000 + index


def _initial_variables(ctx: Context, model: MicroNet) -> dict:
    return init_variables(model, jax.random.key(ctx.config.seed))


def _train(
    ctx: Context, stage: StageSpec, index: int, variables: dict, masks: Any, workdir: Path
) -> tuple[dict, Any, list[dict]]:
    """Train one stage from (variables, masks); return the final (variables, masks, metrics)."""
    config, t = ctx.config, ctx.config.train
    schedule = ctx.schedule(stage.epochs)
    spe = schedule.steps_per_epoch
    tx = make_optimizer(t.lr, stage.epochs, spe, t.momentum, t.weight_decay)
    seed = _stage_seed(config, index)
    is_exit = stage.kind in ("exit", "exit_prune")
    if is_exit:
        overrides = dict(
            mixup_alpha=config.data.mixup_alpha if config.pipeline.exit_mixup else 0.0,
            autoaugment=config.pipeline.exit_autoaugment,
        )
        model = ctx.exit_model
        state = create_exit_state(model.apply, variables, tx, seed, masks["exit_head"])
    else:
        overrides = {}
        model = ctx.model
        state = create_train_state(model.apply, variables, tx, seed, masks)
    state = sharding.place_state(state, ctx.mesh)
    step_cfg = step_config_from(config, stage.epochs, spe, **overrides)
    evaluate_fn = functools.partial(_evaluate, ctx, model, is_exit)
    state, records = fit(
        state,
        step_function(step_cfg, exit_head=is_exit),
        ctx.train,
        schedule,
        workdir,
        evaluate_fn=evaluate_fn,
        lr_of_epoch=lambda e: lr_at_epoch(t.lr, stage.epochs, e),
        keep_checkpoints=t.keep_checkpoints,
        progress=t.progress,
        desc=stage.name,
        **guard_options(t),
    )
    if is_exit:
        final_masks = dict(masks)
        final_masks["exit_head"] = state.masks
        return full_variables(state), final_masks, records
    return variables_of(state), state.masks, records


def _evaluate(ctx: Context, model: MicroNet, is_exit: bool, state: Any) -> dict[str, float]:
    from micronet_jax.train.steps import as_variables

    variables = as_variables(state)
    batch = ctx.config.train.eval_batch_size
    if not is_exit:
        return evaluate(variables, model.apply, ctx.test_images, ctx.test_labels, batch)
    result = exit_predict_exact(
        model, variables, ctx.test_images, ctx.config.pipeline.threshold, batch
    )
    return exit_metrics(result, ctx.test_labels)


def _prepare(
    ctx: Context, stage: StageSpec, variables: dict | None, masks: Any
) -> tuple[dict, Any]:
    """The (variables, masks) a stage starts from, given the previous stage's result."""
    if stage.kind == "baseline":
        variables = _initial_variables(ctx, ctx.model)
        return variables, ones_masks(variables["params"])
    if stage.kind == "prune":
        masks = pruning.prune_masks(variables["params"], stage.target, masks, pruning.main_network)
        masks = jax.tree_util.tree_map(np.asarray, masks)
        if ctx.config.pipeline.rewind:
            start = _initial_variables(ctx, ctx.model)
            variables = {"params": start["params"], "batch_stats": variables["batch_stats"]}
        return variables, masks
    if stage.kind == "exit":
        fresh = init_variables(ctx.exit_model, jax.random.key(ctx.config.seed + 1))
        params = dict(variables["params"])
        params["exit_head"] = fresh["params"]["exit_head"]
        stats = dict(variables["batch_stats"])
        stats["exit_head"] = fresh["batch_stats"]["exit_head"]
        masks = dict(masks)
        masks["exit_head"] = ones_masks(params["exit_head"])
        return {"params": params, "batch_stats": stats}, masks
    masks = pruning.prune_masks(variables["params"], stage.target, masks, pruning.exit_head)
    return variables, jax.tree_util.tree_map(np.asarray, masks)


def _final_template(ctx: Context, stage: StageSpec) -> dict:
    model = ctx.exit_model if stage.kind in ("exit", "exit_prune") else ctx.model
    variables = jax.eval_shape(functools.partial(init_variables, model), jax.random.key(0))
    return {**variables, "masks": variables["params"]}


def _save_final(workdir: Path, variables: dict, masks: Any, summary: dict) -> None:
    """`final` then done.json; a `final` left by a run killed before done.json is redone."""
    if (workdir / "final").exists():
        shutil.rmtree(workdir / "final")
    ckpt = Checkpointer(workdir / "final", keep=1)
    ckpt.save(0, {**variables, "masks": masks}, summary)
    ckpt.close()
    tmp = workdir / "done.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True))
    os.replace(tmp, workdir / "done.json")


def load_final(ctx: Context, stage: StageSpec, workdir: Path) -> tuple[dict, Any]:
    """A finished stage's final variables and masks."""
    ckpt = Checkpointer(workdir / "final", keep=1)
    try:
        tree, _, _ = ckpt.restore(_final_template(ctx, stage))
    finally:
        ckpt.close()
    masks = tree.pop("masks")
    return tree, masks


def run_pipeline(config: Any, workdir: str | Path) -> dict[str, Any]:
    """Run (or resume) every stage, then evaluate and score the result."""
    stages = plan_stages(config)
    check_resume(config, workdir)
    ctx = Context.from_config(config)
    workdir = Path(workdir)
    record_config(config, workdir)
    variables, masks = None, None
    for index, stage in enumerate(stages):
        stage_dir = workdir / stage.name
        if (stage_dir / "done.json").exists():
            variables, masks = load_final(ctx, stage, stage_dir)
            continue
        variables, masks = _prepare(ctx, stage, variables, masks)
        variables, masks, records = _train(ctx, stage, index, variables, masks, stage_dir)
        params = variables["params"]
        summary = {
            "stage": stage.name,
            "epochs": stage.epochs,
            "target": stage.target,
            "final": records[-1] if records else {},
            "sparsity": pruning.global_sparsity(params),
            "exit_sparsity": pruning.global_sparsity(params, pruning.exit_head)
            if "exit_head" in params
            else None,
            "layer_sparsity": pruning.sparsity_by_layer(params),
        }
        _save_final(stage_dir, variables, masks, summary)
    report = build_report(
        ctx.exit_model,
        variables,
        np.asarray(ctx.test_images),
        ctx.test_labels,
        config.pipeline.threshold,
        config.train.eval_batch_size,
        stages=[json.loads((workdir / s.name / "done.json").read_text()) for s in stages],
    )
    write_report(workdir, report)
    return report


def run_test(config: Any, workdir: str | Path | None) -> dict[str, Any]:
    """Evaluate and score `config.checkpoint`: a `.pth` of the original or a pipeline workdir."""
    path = Path(config.checkpoint) if config.checkpoint else None
    if path is None:
        raise ConfigError("set --config.checkpoint to a .pth file or a finished pipeline workdir")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_file():
        from micronet_jax.convert import load_original

        converted = load_original(path)
        model, variables = converted.model, converted.variables
        expected = converted.arch.num_classes
    else:
        ctx_config = config
        stages = plan_stages(ctx_config)
        finished = [s for s in stages if (path / s.name / "done.json").exists()]
        if not finished or finished[-1].kind not in ("exit", "exit_prune"):
            raise CheckpointError(
                f"{path} holds no finished exit stage (found: {[s.name for s in finished]})"
            )
        exit_arch = builders.architecture_from_config(config, with_exit=True)
        model = builders.model_from_config(config, exit_arch)
        ctx = Context(config, None, None, None, builders.model_from_config(config), model)
        variables, _ = load_final(ctx, finished[-1], path / finished[-1].name)
        expected = exit_arch.num_classes
    _, test = builders.load_data(config)
    if test.num_classes != expected:
        raise ConfigError(
            f"the checkpoint has {expected} classes but data set {config.data.name!r} has "
            f"{test.num_classes}"
        )
    report = build_report(
        model,
        variables,
        test.images,
        test.labels,
        config.pipeline.threshold,
        config.train.eval_batch_size,
        source=str(path),
    )
    if workdir:
        write_report(Path(workdir), report)
    else:
        print(report_markdown(report))
    return report
