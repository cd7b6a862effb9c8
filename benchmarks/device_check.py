"""Measure a machine in one command: correctness on the device, then every speed that matters.

    python -m benchmarks.device_check [--payload benchmarks/payload] [--budget 480] [--smoke]

On whatever accelerator JAX finds (or the CPU), with no network, in at most `--budget`
seconds of wall time including compiles. Each part is written to
`benchmarks/results/<device>.json` and `<device>.md` as soon as it finishes, so a run killed
at the budget still leaves every finished part on disk. The parts, most valuable first:

1. environment: versions, device kind and count, memory;
2. checks on the device: the CPU lowering against XLA's (loss and gradients), the released
   checkpoints' logits against the CPU's (full-precision matmuls, TF32 off), bf16 against
   fp32, and data parallelism when there are several devices;
3. train steps (the recipe's: AutoAugment, mixup, forward, backward, SGD) at batch 128 and
   512, one step per dispatch and the best K, fp32 and bf16: images/s, compile time, memory;
4. one whole 50,000-image epoch of the recipe (augmentation, mixup, the test-set evaluation
   the recipe runs every 10 epochs) and the projected time of the whole recipe;
5. a short learning run: the recipe from scratch on real CIFAR-10 images for a fixed time,
   with its test accuracy;
6. inference: the full network and fast early exit (about 32% exiting) at batch 512 and
   4,096, against the 17.3% the operation count predicts.

`--payload` is the folder `python -m benchmarks.device_payload` writes (real images and the
original's checkpoints); without it the checks that need them are skipped and the epoch
runs on uint8 data of the real shape. `--smoke` runs every part at tiny sizes (a CPU check
of this script, in under 3 minutes).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
import re
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from micronet_jax import (
    MicroNet,
    StepConfig,
    build_architecture,
    count_micronet,
    create_train_state,
    default_config,
    enable_compilation_cache,
    init_variables,
    make_optimizer,
    predict,
    train_step,
)
from micronet_jax.config.builders import DTYPES
from micronet_jax.errors import CommandParser
from micronet_jax.models.conv import resolve_impl
from micronet_jax.recipe.stages import plan_stages
from micronet_jax.train import loop
from micronet_jax.train.guard import GuardedStep
from micronet_jax.train.steps import step_function

RECIPE = default_config()  # the recipe's values, not retyped

REPO = Path(__file__).resolve().parents[1]
# the whole recipe's epochs (baseline, 11 pruning rounds, exit head) and its test cadence
RECIPE_EPOCHS = sum(stage.epochs for stage in plan_stages(RECIPE))
EVAL_EVERY = RECIPE.train.eval_every
# --smoke's network: two small blocks, the exit head after the first (compiles fast on a CPU)
TINY = ("r1_k3_s2_e2_i8_o16_se0.25", "r1_k3_s1_e2_i16_o16_se0.25")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each part runs at: the real sizes, or tiny ones for --smoke."""

    arch: Any
    train_batches: tuple[int, ...]
    k_candidates: tuple[int, ...]
    epoch_images: int
    test_images: int
    learning_seconds: float
    exit_batches: tuple[int, ...]
    timing_seconds: float  # at least this long per timed measurement
    smoke: bool = False  # tiny sizes, and no AutoAugment (it only lengthens the compiles)

    @classmethod
    def of(cls, smoke: bool) -> Sizes:
        if smoke:
            arch = build_architecture(TINY, width=1.0, resolution=1.0, head_filters=32)
            return cls(arch.with_exit_head(0), (32,), (1, 4), 256, 128, 0.0, (64,), 0.3, True)
        return cls(
            build_architecture().with_exit_head(4),
            (128, 512),
            (1, 8, 32),
            50_000,
            10_000,
            120.0,
            (512, 4096),
            2.0,
        )


def device_name() -> str:
    kind = jax.devices()[0].device_kind
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or jax.default_backend()


class Results:
    """The JSON record and its Markdown block, rewritten after every part."""

    def __init__(self, out: Path, name: str):
        out.mkdir(parents=True, exist_ok=True)
        self.json_path, self.md_path = out / f"{name}.json", out / f"{name}.md"
        self.data: dict[str, Any] = {"device": name, "started": time.strftime("%F %T")}

    def record(self, part: str, value: Any) -> None:
        self.data[part] = value
        tmp = self.json_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=_jsonable))
        os.replace(tmp, self.json_path)
        self.md_path.write_text(markdown(self.data))


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


# --- 1. environment -----------------------------------------------------------------------


def environment() -> dict[str, Any]:
    import flax
    import jaxlib
    import optax
    import orbax.checkpoint

    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax": orbax.checkpoint.__version__,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "device_memory_gib": stats.get("bytes_limit", 0) / 2**30 or None,
        "host_cpus": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


# --- 2. checks on the device ----------------------------------------------------------------


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


@functools.cache
def loss_and_grads(arch, impl: str, dtype=jnp.float32):
    """Loss and gradients of a fixed batch of 8 under a lowering and compute dtype (full
    precision matmuls), computed once per setting: the checks share them."""
    x = jax.random.normal(jax.random.key(2), (8, 32, 32, 3))
    labels = jnp.arange(8) % 10
    model = MicroNet(arch.with_exit_head(None), conv_impl=impl, dtype=dtype)
    variables = init_variables(model, jax.random.key(0))

    def loss(params):
        (logits, _), _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            rngs={"dropout": jax.random.key(1)},
            mutable=["batch_stats"],
        )
        logits = logits.astype(jnp.float32)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(labels)), labels])

    with jax.default_matmul_precision("highest"):
        return jax.jit(jax.value_and_grad(loss))(variables["params"])


def grad_difference(a, b) -> float:
    """Largest difference relative to the largest gradient: some true gradients are exactly
    zero (a BN bias feeding another BN), and a per-tensor ratio would divide noise by zero."""
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(b))
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y))) / scale for x, y in pairs)


def lowering_agreement(sizes: Sizes) -> dict[str, Any]:
    """Loss and gradients with the CPU's lowering (shifted sums, matmuls) and XLA's convs."""
    (lf, gf), (lx, gx) = (loss_and_grads(sizes.arch, impl) for impl in ("fast", "xla"))
    error = grad_difference(gf, gx)
    return {"loss_rel_err": rel_err(lf, lx), "max_grad_rel_err": error, "ok": error < 1e-3}


def checkpoint_parity(payload: Path | None) -> dict[str, Any]:
    """The released checkpoints' logits here against the CPU's (saved in the payload)."""
    reference = payload / "reference" / "logits.npz" if payload else None
    if reference is None or not reference.exists():
        return {"skipped": "no payload (python -m benchmarks.device_payload)"}
    from micronet_jax import load_original

    saved = np.load(reference)
    images, out = saved["images"], {}
    for name in ("first_submission", "final_ee50"):
        loaded = load_original(payload / "reference" / f"{name}.pth")
        row = {}
        for precision in ("highest", "default"):
            with jax.default_matmul_precision(precision):
                main, exits = predict(loaded.model.apply, loaded.variables, images, batch_size=500)
            row[precision] = {
                "max_abs_diff_main": float(np.max(np.abs(main - saved[f"{name}/main"]))),
                "max_abs_diff_exit": float(np.max(np.abs(exits - saved[f"{name}/exit"]))),
                "top1_agreement": float(
                    np.mean(main.argmax(-1) == saved[f"{name}/main"].argmax(-1))
                ),
            }
        row["within_1e-3"] = (
            max(row["highest"]["max_abs_diff_main"], row["highest"]["max_abs_diff_exit"]) < 1e-3
        )
        out[name] = row
    return out


def bf16_check(sizes: Sizes) -> dict[str, Any]:
    """bfloat16 compute against float32, each with the lowering `auto` picks here."""
    impl = resolve_impl("auto")
    (l32, g32), (l16, g16) = (
        loss_and_grads(sizes.arch, impl, d) for d in (jnp.float32, jnp.bfloat16)
    )
    return {
        "loss_fp32": float(l32),
        "loss_bf16": float(l16),
        "loss_rel_diff": rel_err(l16, l32),
        "max_grad_rel_diff": grad_difference(g16, g32),
        "grads_finite": all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(g16)),
        "grad_dtypes": sorted({str(g.dtype) for g in jax.tree.leaves(g16)}),
    }


def sharding_check(sizes: Sizes) -> dict[str, Any]:
    if jax.device_count() < 2:
        return {"skipped": f"{jax.device_count()} device: nothing to split over"}
    from micronet_jax.distributed import sharding

    model = MicroNet(sizes.arch.with_exit_head(None))
    rng = np.random.default_rng(0)
    batch = 8 * jax.device_count()
    images = rng.integers(0, 256, (2 * batch, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 2 * batch)
    schedule = loop.Schedule(1, batch, 2 * batch)
    step = functools.partial(train_step, cfg=StepConfig())
    results = []
    for mesh in (None, sharding.make_mesh()):
        state = create_train_state(
            model.apply,
            init_variables(model, jax.random.key(0)),
            make_optimizer(RECIPE.train.lr, 2, 2),
            0,
        )
        state = sharding.place_state(state, mesh)
        state, _ = loop.run_epoch(
            state, step, loop.DeviceData.from_numpy(images, labels, mesh), schedule, 1
        )
        results.append(jax.tree.leaves(sharding.local_copy(state.params)))
    return {
        "devices": jax.device_count(),
        "max_param_rel_diff": max(rel_err(a, b) for a, b in zip(*results, strict=True)),
    }


# --- 3. train steps -------------------------------------------------------------------------


class TrainProgram:
    """The loop's own train program (one step, or K in a scan) on data held on the device."""

    def __init__(
        self, arch, batch: int, k: int, dtype: str, data: loop.DeviceData, autoaugment: bool
    ):
        model = MicroNet(arch.with_exit_head(None), dtype=DTYPES[dtype])
        tx = make_optimizer(
            RECIPE.train.lr, RECIPE.train.epochs, loop.Schedule(1, batch, len(data)).steps_per_epoch
        )
        self.state = create_train_state(
            model.apply, init_variables(model, jax.random.key(0)), tx, 0
        )
        self.data, self.batch, self.k = data, batch, k
        self.perm = jnp.arange(len(data), dtype=jnp.int32)
        step = GuardedStep(step_function(StepConfig(autoaugment=autoaugment)))
        statics = dict(step_fn=step, batch_size=batch, batch_sharding=None)
        if k == 1:
            fn = loop.run_batch
        else:
            fn, statics["steps"] = loop.run_steps, k
        self.fn = functools.partial(fn, **statics)
        self.start = 0
        # the first call compiles (into jit's cache, which the epoch part reuses) and runs
        tic = time.perf_counter()
        jax.block_until_ready(self.dispatch())
        first = time.perf_counter() - tic
        tic = time.perf_counter()
        jax.block_until_ready(self.dispatch())
        self.compile_seconds = max(first - (time.perf_counter() - tic), 0.0)
        args = (self.state, data.images, data.labels, self.perm, 0)
        memory = fn.lower(*args, **statics).compile().memory_analysis()  # a cache hit
        self.program_bytes = (
            memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
            if memory is not None
            else None
        )

    def dispatch(self) -> Any:
        self.state, metrics = self.fn(
            self.state, self.data.images, self.data.labels, self.perm, self.start
        )
        self.start = (self.start + self.batch * self.k) % (len(self.data) - self.batch * self.k + 1)
        return metrics

    def images_per_second(self, seconds: float) -> float:
        """Median rate over three timed stretches of at least `seconds / 3` each."""
        jax.block_until_ready(self.dispatch())  # warm
        rates = []
        for _ in range(3):
            count, tic = 0, time.perf_counter()
            while True:
                metrics = self.dispatch()
                count += 1
                if time.perf_counter() - tic > seconds / 3 and count >= 2:
                    break
            jax.block_until_ready(metrics)
            rates.append(count * self.batch * self.k / (time.perf_counter() - tic))
        return statistics.median(rates)


def peak_memory_gib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return peak / 2**30 if peak else None


def synthetic_data(n: int, seed: int = 0) -> loop.DeviceData:
    """uint8 images of the real shape and labels, on the device (CIFAR-100's 100 classes)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return loop.DeviceData.from_numpy(images, rng.integers(0, 100, n))


class TrainSteps:
    """Images/s of each (dtype, batch, K), recorded row by row: first the search for the
    best K (fp32, the recipe's batch), later the other rows while time remains."""

    def __init__(self, sizes: Sizes, results: Results):
        self.sizes, self.results = sizes, results
        self.data = synthetic_data(sizes.epoch_images)  # the epoch's data: programs are reused
        self.out: dict[str, Any] = {"rows": []}

    def measure(self, dtype: str, batch: int, k: int) -> dict[str, Any]:
        program = TrainProgram(self.sizes.arch, batch, k, dtype, self.data, not self.sizes.smoke)
        row = {
            "dtype": dtype,
            "batch": batch,
            "k": k,
            "compile_s": program.compile_seconds,
            "images_per_s": program.images_per_second(self.sizes.timing_seconds),
            "program_gib": program.program_bytes / 2**30 if program.program_bytes else None,
            "peak_device_gib": peak_memory_gib(),
        }
        self.out["rows"].append(row)
        self.results.record("train_steps", self.out)
        return row

    def search(self, remaining: Callable[[], float], reserve: float) -> dict[str, Any]:
        first, rows = self.sizes.train_batches[0], []
        for k in self.sizes.k_candidates:
            if remaining() > reserve:
                rows.append(self.measure("float32", first, k))
        self.out["best_k"] = max(rows, key=lambda r: r["images_per_s"])["k"] if rows else 1
        self.results.record("train_steps", self.out)
        return self.out

    def rest(self, remaining: Callable[[], float], reserve: float) -> dict[str, Any]:
        best = self.out.get("best_k", 1)
        for dtype in ("float32", "bfloat16"):
            for batch in self.sizes.train_batches:
                widths = {1} if self.sizes.smoke and dtype == "bfloat16" else {1, best}
                for k in sorted(widths):
                    done = any(
                        (r["dtype"], r["batch"], r["k"]) == (dtype, batch, k)
                        for r in self.out["rows"]
                    )
                    if not done and remaining() > reserve:
                        self.measure(dtype, batch, k)
        return self.out


# --- 4. one epoch of the recipe -------------------------------------------------------------


def epoch(sizes: Sizes, best_k: int, payload: Path | None) -> dict[str, Any]:
    """A whole epoch of the real loop (shuffle, gather, AutoAugment, mixup, steps) and a
    test-set evaluation; the recipe's projected wall time."""
    data = synthetic_data(sizes.epoch_images, seed=1)
    batch = sizes.train_batches[0]
    model = MicroNet(sizes.arch.with_exit_head(None))
    schedule = loop.Schedule(1, batch, len(data))
    tx = make_optimizer(RECIPE.train.lr, RECIPE.train.epochs, schedule.steps_per_epoch)
    state = create_train_state(model.apply, init_variables(model, jax.random.key(0)), tx, 0)
    step = GuardedStep(step_function(StepConfig(autoaugment=not sizes.smoke)))
    test = np.random.default_rng(2).integers(0, 256, (sizes.test_images, 32, 32, 3), dtype=np.uint8)
    times = []
    for repeat in range(2):  # the first compiles the last partial batch's program
        tic = time.perf_counter()
        progress = loop.EpochProgress(epoch=repeat + 1, first_step=0)
        state = loop.dispatch_epoch(
            state, step, data, schedule, progress, steps_per_dispatch=best_k
        )
        progress.flush()
        train_s = time.perf_counter() - tic
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        tic = time.perf_counter()
        predict(model.apply, variables, test, batch_size=500)
        times.append((train_s, time.perf_counter() - tic))
    train_s, eval_s = times[-1]
    per_epoch = train_s + eval_s / EVAL_EVERY
    return {
        "images": len(data),
        "data": "synthetic uint8 of the real shape",
        "batch": batch,
        "steps_per_dispatch": best_k,
        "train_s": train_s,
        "train_images_per_s": len(data) / train_s,
        "eval_s": eval_s,
        "eval_images": sizes.test_images,
        "epoch_s_with_eval_every_10": per_epoch,
        "recipe_epochs": RECIPE_EPOCHS,
        "projected_recipe_hours": per_epoch * RECIPE_EPOCHS / 3600 * (50_000 / len(data)),
    }


# --- 5. a short learning run ----------------------------------------------------------------


def learning_run(
    sizes: Sizes, payload: Path | None, seconds_per_epoch: float | None, workdir: Path
) -> dict[str, Any]:
    """The recipe from scratch on the payload's real images (train mode of the CLI's code)."""
    archive = payload / "cifar-10-python.tar.gz" if payload else None
    if sizes.smoke:
        archive = make_smoke_archive(workdir)
    elif archive is None or not archive.exists():
        return {"skipped": "no payload: no real images to learn from"}
    from micronet_jax import default_config, train_and_evaluate

    config = default_config()
    config.data.name, config.data.dir, config.data.download = "cifar10", str(archive), False
    if sizes.smoke:  # the tiny network
        config.data.autoaugment = False
        config.model.block_strings, config.model.width, config.model.resolution = TINY, 1.0, 1.0
        config.model.head_filters, config.model.exit_block = 32, 0
        config.train.batch_size, config.train.eval_batch_size = 32, 64
    n_train = 640 if sizes.smoke else 10_000
    per_epoch = (seconds_per_epoch or 1.0) * n_train / sizes.epoch_images
    epochs = int(np.clip(sizes.learning_seconds // max(per_epoch, 1e-3), 2, 200))
    config.train.epochs = epochs
    config.train.eval_every = config.train.checkpoint_every = epochs
    config.train.progress = False
    tic = time.perf_counter()
    _, records = train_and_evaluate(config, workdir / "learning")
    return {
        "data": "random images (smoke)" if sizes.smoke else "real CIFAR-10 images",
        "train_images": n_train,
        "epochs": epochs,
        "wall_s": time.perf_counter() - tic,
        "test_accuracy": records[-1].get("test_accuracy"),
        "chance": 0.1,
        "final_train_loss": records[-1]["train_loss"],
    }


def make_smoke_archive(folder: Path) -> Path:
    """Random images in the standard CIFAR-10 layout (smoke runs without a payload)."""
    import sys

    sys.path.insert(0, str(REPO / "tests"))
    from archives import make_cifar10_python_archive

    path = folder / "cifar-10-python.tar.gz"
    make_cifar10_python_archive(path, n_train=640, n_test=128)
    return path


# --- 6. inference and early exit ------------------------------------------------------------


def inference(sizes: Sizes, payload: Path | None) -> dict[str, Any]:
    """Full network against fast early exit, ~32% exiting, at each batch size."""
    from benchmarks.early_exit import interleaved_times, run_fast, run_full
    from micronet_jax.evaluation.early_exit import exit_confidence

    source = "random init"
    model = MicroNet(sizes.arch)
    variables = init_variables(model, jax.random.key(0))
    pth = payload / "reference" / "first_submission.pth" if payload else None
    if pth is not None and pth.exists() and not sizes.smoke:
        from micronet_jax import load_original

        loaded = load_original(pth)
        model, variables, source = loaded.model, loaded.variables, "first-submission checkpoint"
    images = reference_images(payload, max(sizes.exit_batches) * 2)
    _, exit_logits = predict(model.apply, variables, images, batch_size=500)
    confidence = np.asarray(exit_confidence(jnp.asarray(exit_logits)))
    threshold = float(np.quantile(confidence, 1 - 0.32))
    ratio = float(np.mean(confidence > threshold))
    full_ops = count_micronet(model.arch.with_exit_head(None)).math_ops
    predicted = 1 - count_micronet(model.arch, exit_ratio=ratio).math_ops / full_ops
    rows = []
    for batch in sizes.exit_batches:
        batches = [images[i : i + batch] for i in range(0, len(images), batch)]
        runners = {
            "full": functools.partial(run_full, model, variables),
            "fast": functools.partial(run_fast, model, variables, threshold=threshold),
        }
        for run in runners.values():
            run(batches[0])
        repeats = 2 if sizes.smoke else 5
        times = interleaved_times(runners, batches, repeats)
        saved = statistics.median(
            1 - f / g for f, g in zip(times["fast"], times["full"], strict=True)
        )
        rows.append(
            {
                "batch": batch,
                "full_images_per_s": len(images) / statistics.median(times["full"]),
                "fast_images_per_s": len(images) / statistics.median(times["fast"]),
                "time_saved": saved,
                "share_of_predicted": saved / predicted,
            }
        )
    return {"model": source, "exit_ratio": ratio, "predicted_saving": predicted, "rows": rows}


def reference_images(payload: Path | None, n: int) -> np.ndarray:
    """Real test images from the payload (tiled to `n`), else random ones."""
    path = payload / "reference" / "logits.npz" if payload else None
    if path is not None and path.exists():
        real = np.load(path)["images"]
        return np.resize(real, (n, *real.shape[1:]))
    return np.random.default_rng(3).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


# --- the report ---------------------------------------------------------------------------


def markdown(data: dict[str, Any]) -> str:
    """The block for benchmarks/RESULTS.md."""
    env = data.get("environment") or {}
    title = env.get("device_kind", data["device"])
    lines = [f"### Device check: {title} ({data['started']})", ""]
    if env:
        memory = env.get("device_memory_gib") or 0
        command = "python -m benchmarks.device_check" + (" --smoke" if data.get("smoke") else "")
        lines.append(
            f"{env['device_count']} × {env['device_kind']} ({env['backend']}), {memory:.0f} GiB; "
            f"jax {env['jax']}, jaxlib {env['jaxlib']}, flax {env['flax']}, "
            f"Python {env['python']}. Command: `{command}`."
        )
    lines += _check_lines(data.get("checks") or {})
    lines += _train_lines(data.get("train_steps") or {})
    lines += _epoch_lines(data.get("epoch") or {}, data.get("learning") or {})
    lines += _inference_lines(data.get("inference") or {})
    for part, error in (data.get("errors") or {}).items():
        lines += ["", f"{part}: failed: {error}"]
    return "\n".join(lines) + "\n"


def _check_lines(checks: dict[str, Any]) -> list[str]:
    if not checks:
        return []
    lines = ["", "| check | result |", "|---|---|"]
    return lines + [f"| {name} | {_short(value)} |" for name, value in checks.items()]


def _train_lines(train: dict[str, Any]) -> list[str]:
    if not train.get("rows"):
        return []
    lines = [
        "",
        f"Train steps (the recipe's, on the device's data; best K {train.get('best_k', '?')}):",
        "",
        "| dtype | batch | K | images/s | compile s | program GiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in train["rows"]:
        gib = f"{r['program_gib']:.2f}" if r.get("program_gib") else ""
        lines.append(
            f"| {r['dtype']} | {r['batch']} | {r['k']} | {r['images_per_s']:,.0f} | "
            f"{r['compile_s']:.1f} | {gib} |"
        )
    return lines


def _epoch_lines(e: dict[str, Any], learning: dict[str, Any]) -> list[str]:
    lines = []
    if "train_s" in e:
        lines += [
            "",
            f"Epoch of {e['images']:,} images ({e['data']}, batch {e['batch']}, K "
            f"{e['steps_per_dispatch']}): {e['train_s']:.2f} s training "
            f"({e['train_images_per_s']:,.0f} images/s), {e['eval_s']:.2f} s test evaluation; "
            f"{e['epoch_s_with_eval_every_10']:.2f} s per epoch with the recipe's evaluation "
            f"every 10 → its {e['recipe_epochs']:,} epochs in "
            f"**{e['projected_recipe_hours']:.1f} h**.",
        ]
    if "test_accuracy" in learning:
        lines += [
            "",
            f"Learning run: {learning['epochs']} epochs on {learning['train_images']:,} "
            f"{learning['data']} in {learning['wall_s']:.0f} s → test accuracy "
            f"{learning['test_accuracy']:.2%} (chance 10%).",
        ]
    return lines


def _inference_lines(inf: dict[str, Any]) -> list[str]:
    if not inf.get("rows"):
        return []
    lines = [
        "",
        f"Early exit ({inf['model']}, exit ratio {inf['exit_ratio']:.3f}; the op count "
        f"predicts {inf['predicted_saving']:.1%} saved):",
        "",
        "| batch | full images/s | fast images/s | saved | of predicted |",
        "|---|---|---|---|---|",
    ]
    for r in inf["rows"]:
        lines.append(
            f"| {r['batch']} | {r['full_images_per_s']:,.0f} | {r['fast_images_per_s']:,.0f} | "
            f"{r['time_saved']:.1%} | {r['share_of_predicted']:.0%} |"
        )
    return lines


def _short(value: Any) -> str:
    text = json.dumps(value, default=_jsonable)
    return text if len(text) < 400 else text[:397] + "..."


def main() -> None:
    parser = CommandParser(
        prog="python -m benchmarks.device_check", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--payload", type=Path, default=REPO / "benchmarks" / "payload")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds of wall time")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a CPU check")
    args = parser.parse_args()
    start = time.perf_counter()
    enable_compilation_cache()  # a rerun on the same machine skips the compiles

    def remaining() -> float:
        return args.budget - (time.perf_counter() - start)

    payload = args.payload if args.payload and args.payload.exists() else None
    sizes = Sizes.of(args.smoke)
    name = device_name() + ("-smoke" if args.smoke else "")
    results = Results(args.out, name)
    results.record("smoke", args.smoke)
    results.record("payload", str(payload) if payload else None)
    errors: dict[str, str] = {}
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"device_check_{os.getpid()}"

    def part(label: str, fn: Callable[[], Any], needs: float = 0.0) -> Any:
        if remaining() < needs:
            results.record(label, {"skipped": f"{remaining():.0f} s of the budget left"})
            return None
        tic = time.perf_counter()
        print(f"[{time.perf_counter() - start:6.1f} s] {label} ...", flush=True)
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - one failed part must not lose the others
            errors[label] = f"{type(exc).__name__}: {exc}"[:500]
            traceback.print_exc()
            results.record("errors", errors)
            return None
        if isinstance(value, dict):
            value.setdefault("part_seconds", time.perf_counter() - tic)
        results.record(label, value)
        return value

    part("environment", environment)
    checks = {}
    for label, fn in (
        ("lowering_agreement", lambda: lowering_agreement(sizes)),
        ("checkpoint_parity", lambda: checkpoint_parity(payload)),
        ("bf16", lambda: bf16_check(sizes)),
        ("sharding", lambda: sharding_check(sizes)),
    ):
        checks[label] = part(f"check_{label}", fn)
    results.record("checks", checks)
    steps = TrainSteps(sizes, results)
    # the best K first, then the parts the goals are about; the other rows with what is left
    train = part("train_steps", lambda: steps.search(remaining, reserve=240), needs=60)
    best_k = (train or {}).get("best_k", 1)
    ep = part("epoch", lambda: epoch(sizes, best_k, payload), needs=30)
    per_epoch = (ep or {}).get("train_s")
    part(
        "learning",
        lambda: learning_run(sizes, payload, per_epoch, workdir),
        needs=sizes.learning_seconds + 20,
    )
    part("inference", lambda: inference(sizes, payload), needs=20)
    part("train_steps", lambda: steps.rest(remaining, reserve=45), needs=45)
    results.record("total_seconds", time.perf_counter() - start)
    print(markdown(results.data))
    print(f"written: {results.json_path} and {results.md_path}")


if __name__ == "__main__":
    main()
