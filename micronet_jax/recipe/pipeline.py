"""The recipe as a list of stages: baseline -> pruning rounds -> exit head [-> exit pruning].

Each stage trains under `workdir/<stage>/` (its own checkpoints and metrics.jsonl) and, when
finished, saves its final variables and masks to `workdir/<stage>/final` plus `done.json`
(`stages.py` knows that layout). A rerun skips finished stages and resumes the unfinished
one from its latest checkpoint. `train_and_evaluate` runs stage A alone (mode=train) and
`run_test` evaluates and scores a checkpoint (mode=test).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from micronet_jax.config import builders
from micronet_jax.config.workdir import check_resume, record_config
from micronet_jax.data.augment import eval_transform
from micronet_jax.distributed import sharding
from micronet_jax.errors import CheckpointError, ConfigError
from micronet_jax.evaluation.early_exit import ExitResult, exit_metrics, exit_predict_exact
from micronet_jax.evaluation.scorecard import (
    agreement_metrics,
    build_report,
    report_markdown,
    write_report,
)
from micronet_jax.models.efficientnet import MicroNet, init_variables
from micronet_jax.quant.fake import QuantizedApply, calibrate
from micronet_jax.quant.widths import BitWidths
from micronet_jax.recipe import banner
from micronet_jax.recipe.stages import (
    StageSpec,
    is_done,
    last_exit_stage,
    load_final,
    plan_stages,
    quantize_stage,
    read_summary,
    save_final,
)
from micronet_jax.train import pruning
from micronet_jax.train.loop import (
    DeviceData,
    Schedule,
    fit,
    is_primary,
    resolve_steps_per_dispatch,
)
from micronet_jax.train.optim import (
    cosine_per_step,
    lr_at_epoch,
    make_optimizer,
)
from micronet_jax.train.progress import StageBar, format_duration
from micronet_jax.train.qat import (
    QuantStepConfig,
    create_quant_state,
    quant_step_function,
    quant_variables,
)
from micronet_jax.train.state import (
    create_exit_state,
    create_train_state,
    full_variables,
    ones_masks,
    variables_of,
)
from micronet_jax.train.steps import as_variables, evaluate, step_function


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
    data_line: str = ""  # what was loaded, from where (for the banner)
    initial: dict | None = None  # the initial variables, drawn on first use
    reference: ExitResult | None = None  # the float32 network's test predictions (quantize)

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
            data_line=banner.data_line(config.data.name, train, test),
        )

    def schedule(self, epochs: int) -> Schedule:
        return builders.schedule_of(self.config, epochs, len(self.train))

    @property
    def steps_per_dispatch(self) -> int:
        return resolve_steps_per_dispatch(self.config.train.steps_per_dispatch)

    def announce(self, stages: list[StageSpec], workdir: Path) -> None:
        """The banner: devices, data, model, plan and what is resumed (first process only)."""
        if not is_primary():
            return
        spe = self.schedule(1).steps_per_epoch
        lines = [
            banner.device_line(),
            self.data_line,
            banner.model_line(self.exit_model.arch),
            banner.plan_line(stages, spe, self.config.train.batch_size, self.steps_per_dispatch),
            banner.workdir_line(workdir, stages, spe),
        ]
        print("\n".join(lines), flush=True)


def _stage_seed(config: Any, index: int) -> int:
    return int(config.seed) * 1000 + index


def _initial_variables(ctx: Context) -> dict:
    """The whole model's initial variables, exit head included, drawn once from the seed:
    the baseline (and a rewind) take the main network's, the exit stage the head's. Each
    layer's draw depends only on its name, so the main network's values are those of the
    main network initialised alone."""
    if ctx.initial is None:
        ctx.initial = init_variables(ctx.exit_model, jax.random.key(ctx.config.seed))
    return ctx.initial


def _without_exit_head(variables: dict) -> dict:
    return {k: {n: v for n, v in tree.items() if n != "exit_head"} for k, tree in variables.items()}


@dataclasses.dataclass(frozen=True)
class StageTraining:
    """What differs between a float stage and the quantize stage: the state and step it
    trains, how it is evaluated and how its rate is shown, and what it hands on."""

    state: Any
    step: Any
    evaluate_fn: Any  # state -> test metrics
    lr_of_epoch: Any  # epoch -> the rate its record shows
    result: Any  # final state -> (variables, masks)


def _train(
    ctx: Context,
    stage: StageSpec,
    seed: int,
    variables: dict,
    masks: Any,
    workdir: Path,
    bar: StageBar,
) -> tuple[dict, Any, list[dict]]:
    """Train one stage from (variables, masks); return the final (variables, masks, metrics)."""
    schedule = ctx.schedule(stage.epochs)
    build = _quantized_training if stage.kind == "quantize" else _float_training
    training = build(ctx, stage, seed, variables, masks, schedule.steps_per_epoch)
    kept = sharding.local_copy(masks)  # the share of zeros in the masks: the stage's sparsity
    constants = {"sparsity": pruning.global_sparsity(kept, pruning.main_network)}
    if stage.has_exit_head:
        constants["exit_sparsity"] = pruning.global_sparsity(kept, pruning.exit_head)
    state, records = fit(
        sharding.place_state(training.state, ctx.mesh),
        training.step,
        ctx.train,
        schedule,
        workdir,
        builders.fit_options_of(
            ctx.config,
            evaluate_fn=training.evaluate_fn,
            lr_of_epoch=training.lr_of_epoch,
            progress=bar,
            desc=stage.name,
            constants=constants,
        ),
    )
    return (*training.result(state), records)


def _float_training(
    ctx: Context, stage: StageSpec, seed: int, variables: dict, masks: Any, spe: int
) -> StageTraining:
    """A float32 stage: the main network (baseline, pruning) or the exit head's stages."""
    config, t = ctx.config, ctx.config.train
    tx = make_optimizer(t.lr, stage.epochs, spe, t.momentum, t.weight_decay)
    lr_of_epoch = functools.partial(lr_at_epoch, t.lr, stage.epochs)
    if not stage.has_exit_head:
        return StageTraining(
            state=create_train_state(ctx.model.apply, variables, tx, seed, masks),
            step=step_function(builders.step_config_of(config, stage.epochs, spe)),
            evaluate_fn=functools.partial(_evaluate, ctx, ctx.model, False),
            lr_of_epoch=lr_of_epoch,
            result=lambda state: (variables_of(state), state.masks),
        )
    step_config = builders.step_config_of(
        config,
        stage.epochs,
        spe,
        mixup_alpha=config.data.mixup_alpha if config.pipeline.exit_mixup else 0.0,
        autoaugment=config.pipeline.exit_autoaugment,
    )

    def result(state: Any) -> tuple[dict, Any]:
        return full_variables(state), {**masks, "exit_head": state.masks}

    return StageTraining(
        state=create_exit_state(ctx.exit_model.apply, variables, tx, seed, masks["exit_head"]),
        step=step_function(step_config, exit_head=True),
        evaluate_fn=functools.partial(_evaluate, ctx, ctx.exit_model, True),
        lr_of_epoch=lr_of_epoch,
        result=result,
    )


def _evaluate(ctx: Context, model: MicroNet, is_exit: bool, state: Any) -> dict[str, float]:
    """Test metrics on this process's devices (every process of a multi-host job the same)."""
    variables = sharding.local_copy(as_variables(state))
    batch = ctx.config.train.eval_batch_size
    if not is_exit:
        return evaluate(variables, model.apply, ctx.test_images, ctx.test_labels, batch)
    result = exit_predict_exact(
        model, variables, ctx.test_images, ctx.config.pipeline.threshold, batch
    )
    return exit_metrics(result, ctx.test_labels)


def _quantized_training(
    ctx: Context, stage: StageSpec, seed: int, variables: dict, masks: Any, spe: int
) -> StageTraining:
    """The quantize stage: the whole network trained on its grids (train/qat.py)."""
    config, q, t = ctx.config, ctx.config.quant, ctx.config.train
    bits = builders.bit_widths_of(config)
    tx = make_optimizer(q.lr, stage.epochs, spe, t.momentum, t.weight_decay, per_step=True)
    lr_fn = cosine_per_step(q.lr, stage.epochs * spe)
    variables = dict(variables)
    ranges = variables.pop("quant")
    state = create_quant_state(ctx.exit_model, variables, ranges, tx, seed, masks, bits, q.distill)
    base = builders.step_config_of(config, stage.epochs, spe, lr_fn=lr_fn)
    return StageTraining(
        state=state,
        step=quant_step_function(
            QuantStepConfig(base, bits, q.distill, q.temperature, q.freeze_bn)
        ),
        evaluate_fn=functools.partial(_evaluate_quantized, ctx, bits),
        lr_of_epoch=lambda e: float(lr_fn(e * spe - 1)),  # its last step's
        result=lambda state: (quant_variables(state), state.masks),
    )


def _evaluate_quantized(ctx: Context, bits: BitWidths, state: Any) -> dict[str, float]:
    """Test metrics of the quantised network, and its agreement with the float32 one."""
    variables = sharding.local_copy(quant_variables(state))
    model = ctx.exit_model
    result = exit_predict_exact(
        model,
        variables,
        ctx.test_images,
        ctx.config.pipeline.threshold,
        ctx.config.train.eval_batch_size,
        QuantizedApply(model, bits),
    )
    metrics = exit_metrics(result, ctx.test_labels)
    if ctx.reference is not None:
        metrics.update(agreement_metrics(result, ctx.reference))
    return metrics


def _calibrated(ctx: Context, variables: dict) -> dict:
    """`variables` with the activation ranges calibrated on the first training images."""
    q = ctx.config.quant
    images = np.asarray(sharding.local_copy(ctx.train.images)[: q.calibration_images])
    batches = np.array_split(images, max(1, len(images) // 100))
    calibration = calibrate(ctx.exit_model, variables, batches, eval_transform)
    ranges = calibration.ranges(builders.bit_widths_of(ctx.config), q.calibration)
    ctx.reference = exit_predict_exact(
        ctx.exit_model,
        variables,
        ctx.test_images,
        ctx.config.pipeline.threshold,
        ctx.config.train.eval_batch_size,
    )
    return {**variables, "quant": ranges}


def _prepare(
    ctx: Context, stage: StageSpec, variables: dict | None, masks: Any
) -> tuple[dict, Any]:
    """The (variables, masks) a stage starts from, given the previous stage's result."""
    if stage.kind == "baseline":
        variables = _without_exit_head(_initial_variables(ctx))
        return variables, ones_masks(variables["params"])
    variables = sharding.local_copy(variables)
    if stage.kind == "prune":
        masks = pruning.prune_masks(variables["params"], stage.target, masks, pruning.main_network)
        masks = jax.tree_util.tree_map(np.asarray, masks)
        if ctx.config.pipeline.rewind:
            start = _without_exit_head(_initial_variables(ctx))
            variables = {"params": start["params"], "batch_stats": variables["batch_stats"]}
        return variables, masks
    if stage.kind == "exit":
        fresh = _initial_variables(ctx)
        params = dict(variables["params"])
        params["exit_head"] = fresh["params"]["exit_head"]
        stats = dict(variables["batch_stats"])
        stats["exit_head"] = fresh["batch_stats"]["exit_head"]
        masks = dict(masks)
        masks["exit_head"] = ones_masks(params["exit_head"])
        return {"params": params, "batch_stats": stats}, masks
    if stage.kind == "quantize":
        return _calibrated(ctx, variables), masks
    masks = pruning.prune_masks(variables["params"], stage.target, masks, pruning.exit_head)
    return variables, jax.tree_util.tree_map(np.asarray, masks)


def _summary(stage: StageSpec, variables: dict, records: list[dict], seconds: float) -> dict:
    params = sharding.local_copy(variables["params"])
    return {
        "stage": stage.name,
        "epochs": stage.epochs,
        "target": stage.target,
        "final": records[-1] if records else {},
        "sparsity": pruning.global_sparsity(params, pruning.main_network),
        "exit_sparsity": pruning.global_sparsity(params, pruning.exit_head)
        if "exit_head" in params
        else None,
        "layer_sparsity": pruning.sparsity_by_layer(params),
        "seconds": seconds,
    }


def _stage_bar(ctx: Context, stages: list[StageSpec], index: int, workdir: Path) -> StageBar:
    """'stage i/n name', with the steps of the stages still to come for the overall estimate."""
    stage = stages[index]
    spe = ctx.schedule(stage.epochs).steps_per_epoch
    step = banner.latest_checkpoint_step(workdir / stage.name) or 0
    later = sum(s.epochs for s in stages[index + 1 :]) * spe
    return StageBar(
        f"stage {index + 1}/{len(stages)} {stage.name}",
        stage.epochs * spe,
        initial=step,
        later_steps=later,
        enabled=ctx.config.train.progress,
        quiet=not is_primary(),
    )


def _run_stage(
    ctx: Context,
    stages: list[StageSpec],
    index: int,
    workdir: Path,
    start: Callable[[], tuple[dict, Any]],
) -> tuple[dict, Any]:
    """Stage `index`: its saved result when it finished before, else trained from `start()`
    (its first variables and masks) and saved; returns its final (variables, masks)."""
    stage = stages[index]
    position = f"stage {index + 1}/{len(stages)}"
    stage_dir = workdir / stage.name
    if is_done(workdir, stage):
        if is_primary():
            print(banner.finished_stage_line(position, stage, workdir), flush=True)
        return load_final(ctx.config, stage, stage_dir)
    tic = time.perf_counter()
    bar = _stage_bar(ctx, stages, index, workdir)
    variables, masks = start()
    seed = _stage_seed(ctx.config, index)
    variables, masks, records = _train(ctx, stage, seed, variables, masks, stage_dir, bar)
    summary = _summary(stage, variables, records, time.perf_counter() - tic)
    save_final(stage_dir, variables, masks, summary, write_summary=is_primary())
    bar.note(
        f"{position} {stage.name} done in {format_duration(summary['seconds'])}: "
        + banner.stage_result(summary)
    )
    return variables, masks


def _begin(config: Any, workdir: str | Path, stages: list[StageSpec]) -> tuple[Context, Path]:
    """The resume check, the data and models, the banner and the recorded config."""
    check_resume(config, workdir)
    ctx = Context.from_config(config)
    workdir = Path(workdir)
    ctx.announce(stages, workdir)
    if is_primary():
        record_config(config, workdir)
    return ctx, workdir


def run_pipeline(config: Any, workdir: str | Path) -> dict[str, Any]:
    """Run (or resume) every stage, then evaluate and score the result."""
    stages = plan_stages(config)
    ctx, workdir = _begin(config, workdir, stages)
    variables, masks = None, None
    for index, stage in enumerate(stages):
        start = functools.partial(_prepare, ctx, stage, variables, masks)
        variables, masks = _run_stage(ctx, stages, index, workdir, start)
    bits = builders.bit_widths_of(config) if stages[-1].kind == "quantize" else None
    return _final_report(ctx, variables, workdir, stages, bits)


def run_quantize(config: Any, workdir: str | Path) -> dict[str, Any]:
    """The quantize stage alone (mode=quantize), from `config.checkpoint`: one of the
    original's `.pth` files or a finished pipeline workdir; then the report, with each path's
    agreement with the float32 network it started from."""
    bits = builders.bit_widths_of(config)
    if not bits.quantised:
        raise ConfigError("mode=quantize needs quant.weight_bits or quant.activation_bits below 16")
    checkpoint = load_checkpoint(config, "mode=quantize")
    checkpoint.require_architecture(builders.architecture_from_config(config, with_exit=True))
    stage = quantize_stage(config)
    ctx, workdir = _begin(config, workdir, [stage])
    if is_primary():
        print(f"starting point: {checkpoint.source}", flush=True)
    start = _calibrated(ctx, checkpoint.variables)  # also the float32 reference of the report
    variables, _ = _run_stage(ctx, [stage], 0, workdir, lambda: (start, checkpoint.masks))
    return _final_report(ctx, variables, workdir, [stage], bits, checkpoint.source)


def _final_report(
    ctx: Context,
    variables: dict,
    workdir: Path,
    stages: list[StageSpec],
    bits: BitWidths | None,
    source: str | None = None,
) -> dict[str, Any]:
    """The report of a finished run (written by the first process), scored at `bits` when
    its last stage quantised, with agreement against `ctx.reference` where there is one."""
    config = ctx.config
    report = build_report(
        ctx.exit_model,
        sharding.local_copy(variables),
        np.asarray(ctx.test_images),
        ctx.test_labels,
        config.pipeline.threshold,
        config.train.eval_batch_size,
        stages=[read_summary(workdir, s) for s in stages],
        source=source,
        bits=bits,
        reference=ctx.reference,
    )
    if is_primary():
        write_report(workdir, report)
    return report


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A network to evaluate or start from: the original's `.pth` or a finished workdir."""

    path: Path
    model: MicroNet  # with the exit head
    variables: dict
    masks: Any
    source: str  # what was read, for the banner and the report

    def require_architecture(self, arch: Any) -> None:
        """Refuse a checkpoint of another architecture than `model.*` describes."""
        if self.model.arch != arch:
            raise ConfigError(
                f"{self.source} holds another architecture than model.* describes (classes "
                f"{self.model.arch.num_classes} vs {arch.num_classes}, exit block "
                f"{self.model.arch.exit_head and self.model.arch.exit_head.after_block}); set "
                "--config.model.num_classes and --config.model.exit_block to match it"
            )


def load_checkpoint(config: Any, mode: str) -> Checkpoint:
    """`config.checkpoint` read as `mode` (its name in the errors) needs it."""
    path = Path(config.checkpoint) if config.checkpoint else None
    if path is None:
        raise ConfigError(
            f"{mode} reads --config.checkpoint (a .pth file or a finished pipeline workdir); set it"
        )
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_file():
        from micronet_jax.models.torch_import import load_original

        converted = load_original(path)
        return Checkpoint(
            path,
            converted.model,
            converted.variables,
            converted.masks,
            f"{path} (the original's checkpoint)",
        )
    stage = last_exit_stage(config, path)
    arch = builders.architecture_from_config(config, with_exit=True)
    variables, masks = load_final(config, stage, path / stage.name)
    model = builders.model_from_config(config, arch)
    return Checkpoint(path, model, variables, masks, f"{path}/{stage.name}")


def train_and_evaluate(config: Any, workdir: str | Path) -> tuple[Any, list[dict[str, Any]]]:
    """Stage A of the recipe alone (mode=train): the dense network from scratch, for
    `config.train.epochs` epochs, its files directly under `workdir`."""
    check_resume(config, workdir)
    ctx = Context.from_config(config)
    workdir = Path(workdir)
    stage = StageSpec("baseline", "baseline", config.train.epochs)
    if is_primary():
        print("\n".join(_train_banner(ctx, stage, workdir)), flush=True)
        record_config(config, workdir)
    spe = ctx.schedule(stage.epochs).steps_per_epoch
    bar = StageBar(
        "baseline",
        stage.epochs * spe,
        initial=banner.latest_checkpoint_step(workdir) or 0,
        enabled=config.train.progress,
        quiet=not is_primary(),
    )
    variables, masks = _prepare(ctx, stage, None, None)
    tic = time.perf_counter()
    variables, _, records = _train(ctx, stage, int(config.seed), variables, masks, workdir, bar)
    summary = _summary(stage, variables, records, time.perf_counter() - tic)
    took = format_duration(summary["seconds"])
    bar.note(f"baseline done in {took}: " + banner.stage_result(summary))
    return variables, records


def _train_banner(ctx: Context, stage: StageSpec, workdir: Path) -> list[str]:
    spe = ctx.schedule(stage.epochs).steps_per_epoch
    step = banner.latest_checkpoint_step(workdir)
    resumed = f"resumes at step {step:,}" if step is not None else "new run"
    return [
        banner.device_line(),
        ctx.data_line,
        banner.model_line(ctx.model.arch),
        banner.plan_line([stage], spe, ctx.config.train.batch_size, ctx.steps_per_dispatch),
        f"workdir: {workdir} ({resumed})",
    ]


def run_test(config: Any, workdir: str | Path | None) -> dict[str, Any]:
    """Evaluate and score `config.checkpoint`: a `.pth` of the original or a pipeline workdir."""
    checkpoint = load_checkpoint(config, "mode=test")
    model, variables = checkpoint.model, checkpoint.variables
    train, test = builders.load_data(config)
    expected = model.arch.num_classes
    if test.num_classes != expected:
        raise ConfigError(
            f"the checkpoint has {expected} classes but data set {config.data.name!r} has "
            f"{test.num_classes}"
        )
    bits = builders.bit_widths_of(config)
    if is_primary():
        lines = [banner.device_line(), banner.data_line(config.data.name, None, test)]
        print("\n".join([*lines, banner.model_line(model.arch), f"checkpoint: {checkpoint.path}"]))
    reference = None
    if bits.quantised:
        reference = exit_predict_exact(
            model, variables, test.images, config.pipeline.threshold, config.train.eval_batch_size
        )
        variables = _post_training_quantized(config, model, variables, train.images, bits)
    report = build_report(
        model,
        variables,
        test.images,
        test.labels,
        config.pipeline.threshold,
        config.train.eval_batch_size,
        source=str(checkpoint.path),
        bits=bits if bits.quantised else None,
        reference=reference,
    )
    if workdir:
        write_report(Path(workdir), report)
    else:
        print(report_markdown(report))
    return report


def _post_training_quantized(
    config: Any, model: MicroNet, variables: dict, train_images: np.ndarray, bits: BitWidths
) -> dict:
    """The checkpoint on the grids of `bits` (mode=test with widths below 16), by
    `quant.ptq_method` on the first `quant.calibration_images` training images."""
    from tqdm.auto import tqdm

    from micronet_jax.quant.ptq import parse_method, post_training_quantize

    method = parse_method(config.quant.ptq_method)
    images = np.asarray(train_images[: config.quant.calibration_images])
    if is_primary():
        print(
            f"post-training quantisation: {bits.describe()}; {method.name} on "
            f"{len(images):,} training images",
            flush=True,
        )
    quantized, _ = post_training_quantize(
        model,
        variables,
        images,
        bits,
        method,
        progress=lambda total: tqdm(total=total, desc="quantise", disable=not is_primary()),
    )
    return quantized
