"""The epoch loop: shuffle on the device, run jitted steps, evaluate, log, checkpoint, resume.

`fit` runs one stage of training for any step function and state (the pipeline builds
both from a config).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from micronet_jax.backend import on_cpu
from micronet_jax.distributed.preemption import AgreedStop
from micronet_jax.errors import CheckpointError
from micronet_jax.train import metrics as metrics_io
from micronet_jax.train.checkpoint import Checkpointer
from micronet_jax.train.guard import EpochProgress, GuardedStep, Interrupted, StopSignals, Watch
from micronet_jax.train.metrics import ScalarWriter
from micronet_jax.train.progress import StageBar
from micronet_jax.train.state import SHUFFLE_STREAM, STEP_STREAM, stream_key

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DeviceData:
    """A whole data set held on the device as uint8 images and int32 labels."""

    images: jax.Array
    labels: jax.Array
    batch_sharding: Any = None  # with a mesh: each gathered batch is split over its devices

    @classmethod
    def from_numpy(cls, images: np.ndarray, labels: np.ndarray, mesh: Any = None) -> DeviceData:
        """On the default device, or (with a `mesh`) replicated on every device of it."""
        if mesh is None:
            return cls(jax.device_put(images), jax.device_put(labels.astype(np.int32)))
        from micronet_jax.distributed import sharding

        images, labels = sharding.replicate((images, labels.astype(np.int32)), mesh)
        return cls(images, labels, sharding.batch_sharding(mesh))

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How one stage walks its data: sizes, counts and how often to evaluate and save."""

    epochs: int
    batch_size: int
    num_examples: int
    drop_last: bool = False
    batch_multiple: int = 4  # ghost-BN splits: every batch size must be a multiple
    eval_every: int = 10
    checkpoint_every: int = 10

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """Sizes of the steps of one epoch (a last partial batch when not drop_last)."""
        full, rest = divmod(self.num_examples, self.batch_size)
        rest -= rest % self.batch_multiple
        sizes = (self.batch_size,) * full
        if rest and not self.drop_last:
            sizes += (rest,)
        return sizes

    @property
    def steps_per_epoch(self) -> int:
        return len(self.batch_sizes)


StepFn = Callable[[Any, dict, jax.Array], tuple[Any, dict]]

# Train steps per dispatch on accelerators when `train.steps_per_dispatch` is 0 (auto): long
# enough that the host's dispatch cost vanishes beside the device's work, short enough that
# signals and NaN checks are still answered within a fraction of a second.
ACCELERATOR_STEPS_PER_DISPATCH = 16


def resolve_steps_per_dispatch(value: int) -> int:
    """`value`, or for 0 (auto): 1 on CPU (a step there takes far longer than its dispatch),
    `ACCELERATOR_STEPS_PER_DISPATCH` on a GPU or TPU."""
    if value:
        return int(value)
    return 1 if on_cpu() else ACCELERATOR_STEPS_PER_DISPATCH


def _one_step(state, images, labels, perm, start, step_fn, batch_size, batch_sharding):
    """Gather one shuffled batch on the device and run the step on it."""
    idx = lax.dynamic_slice(perm, (start,), (batch_size,))
    batch = {"image": images[idx], "label": labels[idx]}
    if batch_sharding is not None:
        batch = lax.with_sharding_constraint(batch, batch_sharding)
    key = stream_key(state.rng, STEP_STREAM, state.step)
    return step_fn(state, batch, key)


@functools.partial(
    jax.jit, static_argnames=("step_fn", "batch_size", "batch_sharding"), donate_argnums=(0,)
)
def run_batch(
    state, images, labels, perm, start, *, step_fn: StepFn, batch_size: int, batch_sharding=None
):
    """One train step on the batch at `start` of the epoch's permutation."""
    return _one_step(state, images, labels, perm, start, step_fn, batch_size, batch_sharding)


@functools.partial(
    jax.jit,
    static_argnames=("step_fn", "batch_size", "steps", "batch_sharding"),
    donate_argnums=(0,),
)
def run_steps(
    state,
    images,
    labels,
    perm,
    start,
    *,
    step_fn: StepFn,
    batch_size: int,
    steps: int,
    batch_sharding=None,
):
    """`steps` train steps in one program (a `lax.scan`): batch j starts at start + j·batch_size.

    Every step draws its key from the state's step counter, exactly as `run_batch` does, so
    the result is the same as `steps` calls of it; the metrics come back stacked.
    """

    def body(state, j):
        offset = start + j * batch_size
        return _one_step(state, images, labels, perm, offset, step_fn, batch_size, batch_sharding)

    return lax.scan(body, state, jnp.arange(steps))


@jax.jit
def _permutation(rng: jax.Array, epoch: jax.Array, n_holder: jax.Array) -> jax.Array:
    return jax.random.permutation(stream_key(rng, SHUFFLE_STREAM, epoch), n_holder.shape[0])


def dispatch_groups(sizes: tuple[int, ...], first: int, steps_per_dispatch: int):
    """Yield (start index, batch size, steps) covering `sizes[first:]`: runs of
    `steps_per_dispatch` equal batches in one program each; the rest (an epoch's tail that does
    not fill a group, a last partial batch) one step at a time, so only two programs exist."""
    i = first
    k = max(1, steps_per_dispatch)
    while i < len(sizes):
        size = sizes[i]
        run = 1
        while run < k and i + run < len(sizes) and sizes[i + run] == size:
            run += 1
        steps = k if run == k else 1
        yield i, size, steps
        i += steps


def dispatch_epoch(
    state: Any,
    step_fn: StepFn,
    data: DeviceData,
    schedule: Schedule,
    partial: EpochProgress,
    progress: StageBar | None = None,
    stop: Callable[[EpochProgress], bool] | None = None,
    steps_per_dispatch: int = 1,
) -> Any:
    """Dispatch the rest of `partial`'s epoch from batch `partial.index` on (the permutation
    depends only on (rng, epoch), so a resumed epoch regenerates it) and return the state.

    `partial` records every dispatch (its metrics stay on the device until flushed);
    `stop(partial)` returning True ends the epoch early at a dispatch boundary. Steps run
    `steps_per_dispatch` at a time where they can; the results do not depend on it.
    """
    sizes = schedule.batch_sizes
    perm = _permutation(state.rng, jnp.asarray(partial.epoch), data.labels)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    for index, size, steps in dispatch_groups(sizes, partial.index, steps_per_dispatch):
        if stop is not None and stop(partial):
            break
        common = dict(step_fn=step_fn, batch_size=size, batch_sharding=data.batch_sharding)
        args = (state, data.images, data.labels, perm, offsets[index])
        if steps == 1:
            state, step_metrics = run_batch(*args, **common)
        else:
            state, step_metrics = run_steps(*args, steps=steps, **common)
        partial.add(step_metrics, size, steps)
        if progress is not None:
            progress.advance(steps, size * steps)
    return state


def run_epoch(
    state: Any,
    step_fn: StepFn,
    data: DeviceData,
    schedule: Schedule,
    epoch: int,
    steps_per_dispatch: int = 1,
) -> tuple[Any, dict[str, float]]:
    """One whole epoch (1-based `epoch`): on-device shuffle, every step; the state and the
    epoch's metrics averaged over its samples."""
    partial = EpochProgress(epoch=epoch, first_step=(epoch - 1) * schedule.steps_per_epoch)
    state = dispatch_epoch(
        state, step_fn, data, schedule, partial, steps_per_dispatch=steps_per_dispatch
    )
    partial.flush()
    return state, partial.averages()


def is_primary() -> bool:
    """Whether this process writes the run's files (the first process of a multi-host job)."""
    return jax.process_index() == 0


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """How `fit` runs a stage, besides its state, step, data, schedule and folder."""

    evaluate_fn: Callable[[Any], dict[str, float]] | None = None  # state -> test metrics
    lr_of_epoch: Callable[[int], float] | None = None  # the rate each epoch's record shows
    keep_checkpoints: int = 3
    progress: bool | StageBar = True  # a StageBar, or a plain bar named `desc` / lines only
    desc: str = "train"
    nan_policy: str = "stop"  # a non-finite step: 'stop' raises, 'skip' counts it
    nan_check_every: int = 10  # steps between host reads of the finiteness flags
    inject_nan_step: int = -1  # fault injection: that global step's loss is NaN
    min_free_mb: float = 50  # refuse to checkpoint with less free disk
    steps_per_dispatch: int = 1
    constants: dict[str, float] | None = None  # added to every record (e.g. the sparsity)


def fit(
    state: Any,
    step_fn: StepFn,
    train_data: DeviceData,
    schedule: Schedule,
    workdir: str | Path,
    options: FitOptions | None = None,
) -> tuple[Any, list[dict[str, Any]]]:
    """Train `state` for the schedule's epochs under `workdir`, resuming from its checkpoints.

    Writes `workdir/metrics.jsonl` (one record per epoch, plus `options.constants` such as
    the stage's sparsity), TensorBoard scalars of the same records, orbax checkpoints under
    `workdir/checkpoints` (every `checkpoint_every` epochs and at the end) and the best
    evaluated one under `workdir/best`. Returns the final state and the metric records.
    In a multi-host job every process trains and checkpoints; only the first writes files.

    A step with a non-finite loss or parameters is never applied (see `guard.GuardedStep`);
    `nan_policy` 'stop' raises NonFiniteError, 'skip' counts it in `skipped_steps`. SIGINT
    or SIGTERM saves a checkpoint at the next dispatch boundary and raises
    `guard.Interrupted`; the rerun resumes mid-epoch from it. In a job of several processes
    they all stop at the boundary they agree on (`preemption.AgreedStop`) and save it once.
    """
    options = options or FitOptions()
    workdir = Path(workdir)
    primary = is_primary()
    if primary:
        workdir.mkdir(parents=True, exist_ok=True)
    metrics_path = workdir / "metrics.jsonl"
    keep, min_free = options.keep_checkpoints, options.min_free_mb
    ckpt = Checkpointer(workdir / "checkpoints", keep=keep, min_free_mb=min_free)
    best = Checkpointer(workdir / "best", keep=1, min_free_mb=min_free)
    spe = schedule.steps_per_epoch
    if spe == 0:
        raise ValueError(
            f"{schedule.num_examples} training images make no batch of {schedule.batch_size}"
        )
    step_fn = GuardedStep(step_fn, options.inject_nan_step)
    state, best_accuracy, partial = _resume(ckpt, state, spe, workdir)
    done_epochs = int(state.step) // spe
    if primary:
        metrics_io.truncate_after(metrics_path, "epoch", done_epochs)
    bar = _stage_bar(options, schedule.epochs * spe, int(state.step), primary)
    scalars = ScalarWriter(workdir, done_epochs) if primary else None
    wall_start = time.time()
    signals = AgreedStop() if jax.process_count() > 1 else StopSignals()
    watch = Watch(options.nan_policy, max(1, options.nan_check_every), signals, options.desc, spe)

    def at_boundary(partial: EpochProgress) -> bool:
        stop = watch(partial)
        if partial.latest:
            bar.observe(partial.latest)
        return stop

    try:
        signals.__enter__()
        for epoch in range(done_epochs + 1, schedule.epochs + 1):
            tic = time.perf_counter()
            partial = partial or EpochProgress(epoch=epoch, first_step=(epoch - 1) * spe)
            state = dispatch_epoch(
                state,
                step_fn,
                train_data,
                schedule,
                partial,
                bar,
                at_boundary,
                options.steps_per_dispatch,
            )
            watch.check(partial)  # before anything is saved: the flags of the last steps
            bar.observe(partial.latest)
            if partial.index < spe:
                _save_interrupted(ckpt, state, partial, best_accuracy, signals)
            record = _epoch_record(state, partial, schedule, options, epoch, tic, wall_start)
            partial = None
            last = epoch == schedule.epochs
            if options.evaluate_fn is not None and (last or epoch % schedule.eval_every == 0):
                test = options.evaluate_fn(state)
                record.update({f"test_{k}": v for k, v in test.items()})
                bar.note(evaluation_line(options.desc, epoch, schedule.epochs, test))
            if primary:
                metrics_io.append_record(metrics_path, record)
                scalars.write(record, epoch)
            best_accuracy = _save_epoch(ckpt, best, state, record, best_accuracy, schedule, last)
    finally:
        signals.__exit__()
        bar.close()
        if scalars is not None:
            scalars.close()
        ckpt.close()
        best.close()
    return state, metrics_io.read_records(metrics_path)


def _resume(
    ckpt: Checkpointer, state: Any, steps_per_epoch: int, workdir: Path
) -> tuple[Any, float, EpochProgress | None]:
    """The state of the latest checkpoint (or `state` when there is none), the best test
    accuracy so far, and the sums of the epoch a mid-epoch checkpoint stopped in."""
    if ckpt.latest_step() is None:
        return state, -1.0, None
    state, meta, _ = ckpt.restore(state)
    partial = _resumed_partial(meta, int(state.step), steps_per_epoch, ckpt.directory)
    log.info("resumed %s at epoch %d", workdir, int(state.step) // steps_per_epoch)
    return state, meta.get("best_accuracy", -1.0), partial


def _stage_bar(options: FitOptions, total: int, initial: int, primary: bool) -> StageBar:
    bar = options.progress if isinstance(options.progress, StageBar) else None
    if bar is None:
        bar = StageBar(options.desc, total, initial, enabled=bool(options.progress))
    bar.quiet = bar.quiet or not primary
    return bar


def _epoch_record(
    state: Any,
    partial: EpochProgress,
    schedule: Schedule,
    options: FitOptions,
    epoch: int,
    tic: float,
    wall_start: float,
) -> dict[str, Any]:
    """One finished epoch's line of metrics.jsonl, before its evaluation."""
    train_metrics = partial.averages()
    lr = options.lr_of_epoch(epoch) if options.lr_of_epoch else train_metrics.get("lr")
    return {
        "epoch": epoch,
        "step": int(state.step),
        "lr": lr,
        "train_loss": train_metrics["loss"],
        "train_accuracy": train_metrics["accuracy"],
        "images_per_sec": sum(schedule.batch_sizes) / (time.perf_counter() - tic),
        "wall_time": time.time() - wall_start,
        "skipped_steps": partial.skipped,
        **(options.constants or {}),
    }


def _save_epoch(
    ckpt: Checkpointer,
    best: Checkpointer,
    state: Any,
    record: dict[str, Any],
    best_accuracy: float,
    schedule: Schedule,
    last: bool,
) -> float:
    """Checkpoint a finished epoch when due (and at the end), and as the best when its test
    accuracy beats every earlier one; the best accuracy so far."""
    accuracy = record.get("test_accuracy")
    improved = accuracy is not None and accuracy > best_accuracy
    if improved:
        best_accuracy = accuracy
    meta = {"epoch": record["epoch"], "best_accuracy": best_accuracy, "record": record}
    if last or record["epoch"] % schedule.checkpoint_every == 0:
        ckpt.save(int(state.step), state, meta)
    if improved:
        best.save(int(state.step), state, meta)
    return best_accuracy


def evaluation_line(desc: str, epoch: int, epochs: int, test: dict[str, float]) -> str:
    """'prune_02 epoch 10/600: test loss 1.2345, accuracy 0.5612, exit ratio 0.3100'."""
    parts = [f"test loss {test['loss']:.4f}" if "loss" in test else None]
    parts.append(f"accuracy {test['accuracy']:.4f}" if "accuracy" in test else None)
    if "exit_ratio" in test:
        parts.append(f"exit ratio {test['exit_ratio']:.4f}")
    if "combined_agreement" in test:  # a quantised network against its float32 self
        parts.append(f"agreement with float32 {test['combined_agreement']:.4f}")
    return f"{desc} epoch {epoch}/{epochs}: " + ", ".join(p for p in parts if p)


def _resumed_partial(
    meta: dict, step: int, steps_per_epoch: int, directory: Path
) -> EpochProgress | None:
    """The sums of the epoch a mid-epoch checkpoint stopped in (None at an epoch boundary)."""
    index = step % steps_per_epoch
    if index == 0:
        return None
    saved = meta.get("partial")
    if not saved or int(saved.get("index", -1)) != index:
        raise CheckpointError(
            f"checkpoint {directory}/{step} stops mid-epoch (batch {index} of "
            f"{steps_per_epoch}) but holds no matching epoch sums; was the batch size changed?"
        )
    return EpochProgress.from_json(saved, first_step=step - index)


def _save_interrupted(
    ckpt: Checkpointer, state: Any, partial: EpochProgress, best_accuracy: float, signals: Any
) -> None:
    """Save the state at this dispatch boundary with the partial epoch's sums, then stop."""
    step = int(state.step)
    meta = {"epoch": partial.epoch - 1, "best_accuracy": best_accuracy}
    meta["partial"] = partial.to_json()
    if ckpt.latest_step() != step:
        ckpt.save(step, state, meta)
    where = f"in epoch {partial.epoch} after batch {partial.index}"
    saved = f"saved checkpoint {ckpt.directory}/{step}"
    if signals.agreed:
        raise Interrupted(
            f"preemption notice: all {jax.process_count()} processes stopped at step {step} "
            f"({where}); {saved}; rerun the same command on every host to resume",
            None,
        )
    raise Interrupted(
        f"stopped by signal {signals.signum} {where}; {saved}; rerun the same command to resume",
        signals.signum,
    )
