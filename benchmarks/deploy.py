"""The exported network in the CPU runtimes people deploy with: speed side by side, one run.

    python -m benchmarks.deploy --onnx_dir=runs/export [--out=runs/deploy] [--repeats 5]

Rows: every runtime × precision × mode.
- JAX float32: the project's own CPU inference.
- onnxruntime: `model.onnx` (float32), `model_int8.onnx` (the integer graph), and as
  a peer onnxruntime's own `quantize_static` of model.onnx (per channel, MinMax on the same
  calibration images, integer kernels end to end).
- OpenVINO: the same ONNX files; float32 with `INFERENCE_PRECISION_HINT=f32`, and its default
  on a bf16-capable CPU (bf16 arithmetic) as a row of its own.
- LiteRT (XNNPACK): `model.tflite`, `model_sparse.tflite` (the same, pruned kernels in
  LiteRT's sparse encoding: XNNPACK's sparse inference where it takes them) and
  `model_int8.tflite` (full integer), each at any batch size (`export --format=onnx,tflite`).

Modes: "full" (both heads on every image) and "exit" (the early exit decided in the caller:
the exit head's graph first, the tail's only on the images that continue; the threshold set
so that `--ratio` of the measured images exit, since CIFAR-10 is not the network's data).
Batch 1: median and p90 latency over `--images` real CIFAR-10 test images, one at a time;
batch `--batch`: images/s. Runtimes alternate within every repeat; figures are medians over
repeats; every runtime gets `--threads` threads (JAX: its default, every core).

Writes `--out`/deploy.json, deploy.csv and deploy.png (images/s per runtime and width). The
files must be the export of `--checkpoint` (its card's sha256) and unchanged since (sizes).
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.shared_data import CIFAR10_ARCHIVE, checkpoint
from micronet_jax.deploy.onnxruntime_session import file_sha256
from micronet_jax.errors import CommandParser, MicronetError, fail
from micronet_jax.evaluation.early_exit import top_probability

CHECKPOINT = checkpoint()
ARCHIVE = CIFAR10_ARCHIVE
RUNTIMES = ("jax", "onnxruntime", "openvino", "litert")
EXTRA = {"onnxruntime": "onnxruntime", "openvino": "openvino", "litert": "ai_edge_litert"}


# --- runners: predictions of a batch, both heads ("full") or with the exit decided here ------


class JaxRunner:
    """The project's own float32 CPU inference: the jitted network, and for early exit the
    head and tail programs (batch 1) or `exit_predict_fast` (batches)."""

    runtime, precision = "JAX", "float32"

    def __init__(self, model, variables) -> None:
        import jax

        from micronet_jax import eval_transform
        from micronet_jax.models.microbatch import map_eval_batch

        self.model, self.variables = model, variables
        self._full = jax.jit(
            lambda x: map_eval_batch(lambda b: model.apply(variables, eval_transform(b)), x)
        )

        def head(x):
            features = model.apply(variables, eval_transform(x), method="trunk")
            return model.apply(variables, features, method="exit"), features

        self._head = jax.jit(head)
        self._tail = jax.jit(lambda f: model.apply(variables, f, method="tail"))

    def logits(self, images):
        logits, exit_logits = self._full(images)
        return np.asarray(logits), np.asarray(exit_logits)

    def full(self, images):
        return self.logits(images)[0].argmax(-1)

    def outputs(self, images):
        return self.logits(images)

    def exit(self, images, threshold):
        from micronet_jax import exit_predict_fast

        if len(images) > 1:
            return exit_predict_fast(
                self.model, self.variables, images, threshold, batch_size=len(images)
            ).predictions
        exit_logits, features = self._head(images)
        exit_logits = np.asarray(exit_logits)
        if top_probability(exit_logits)[0] > threshold:
            return exit_logits.argmax(-1)
        return np.asarray(self._tail(features)).argmax(-1)


class PairRunner:
    """A runtime's whole graph and its early-exit pair, each a function of a batch."""

    def __init__(self, runtime: str, precision: str, full, head, tail) -> None:
        self.runtime, self.precision = runtime, precision
        self._full, self._head, self._tail = full, head, tail

    def full(self, images):
        return self._full(images)[0].argmax(-1)

    def outputs(self, images):
        return tuple(np.asarray(o) for o in self._full(images))

    def exit(self, images, threshold):
        exit_logits, features = self._head(images)
        exited = top_probability(exit_logits) > threshold
        predictions = exit_logits.argmax(-1)
        if not exited.all():
            predictions[~exited] = self._tail(features[~exited])[0].argmax(-1)
        return predictions

    @property
    def has_exit(self) -> bool:
        return self._head is not None


def onnxruntime_runner(precision: str, full: Path, head: Path | None, tail: Path | None, threads):
    from micronet_jax.deploy.onnxruntime_session import session as open_session

    def session(path, name):
        if path is None:
            return None
        run = open_session(path, threads, inter_op_threads=1).run
        return lambda x: run(None, {name: x})

    return PairRunner(
        "onnxruntime",
        precision,
        session(full, "images"),
        session(head, "images"),
        session(tail, "features"),
    )


def openvino_runner(precision: str, hint: str, full: Path, head: Path, tail: Path, threads):
    """OpenVINO's CPU plugin on the ONNX files; `hint` its inference precision (f32, or bf16,
    its default on a CPU with bf16 units)."""
    from micronet_jax.deploy import openvino_runtime

    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": hint}

    def compiled(path):
        if path is None:
            return None
        model = openvino_runtime.compile_model(path, config)
        request = model.create_infer_request()

        def run(x):
            result = request.infer({0: x})
            return [result[out] for out in model.outputs]

        return run

    return PairRunner("OpenVINO", precision, compiled(full), compiled(head), compiled(tail))


def litert_runner(precision: str, folder: Path, suffix: str, threads: int):
    """LiteRT with XNNPACK: each file at the batch it is given (one interpreter per size;
    the tail's varying counts padded to a multiple of 16)."""
    from micronet_jax.deploy.tflite import Runner

    exit_dir = folder / "early_exit"
    has_pair = (exit_dir / f"head{suffix}.tflite").exists()
    return PairRunner(
        "LiteRT",
        precision,
        Runner(folder / f"model{suffix}.tflite", threads),
        Runner(exit_dir / f"head{suffix}.tflite", threads) if has_pair else None,
        Runner(exit_dir / f"tail{suffix}.tflite", threads, pad_to=16) if has_pair else None,
    )


# --- timing ----------------------------------------------------------------------------------


def time_batch1(fn: Callable, images: np.ndarray) -> list[float]:
    """Latency of each image, one at a time (ms)."""
    out = []
    for i in range(len(images)):
        tic = time.perf_counter()
        fn(images[i : i + 1])
        out.append((time.perf_counter() - tic) * 1e3)
    return out


def time_batches(fn: Callable, images: np.ndarray, batch: int) -> float:
    """Images per second over `images` in batches of `batch`."""
    tic = time.perf_counter()
    for start in range(0, len(images) - batch + 1, batch):
        fn(images[start : start + batch])
    return (len(images) // batch) * batch / (time.perf_counter() - tic)


# --- inputs ----------------------------------------------------------------------------------


def cifar10_images(archive: Path, split: str, count: int) -> np.ndarray:
    from micronet_jax import load_train_test

    train, test = load_train_test("cifar10", str(archive), download=False)
    return (train if split == "train" else test).images[:count]


def check_export(folder: Path, checkpoint: Path, runtimes: tuple[str, ...]) -> dict:
    """The export's card, once the folder is shown to be the export of `checkpoint` with
    every file it lists unchanged and the files these runtimes read present."""
    card_path = folder / "card.json"
    if not card_path.is_file():
        raise MicronetError(f"--onnx_dir {folder}: no card.json (make it with micronet_jax.export)")
    card = json.loads(card_path.read_text())
    recorded = card.get("source", {}).get("sha256")
    if recorded != file_sha256(checkpoint):
        raise MicronetError(
            f"--onnx_dir {folder} is not an export of --checkpoint {checkpoint} "
            f"(its card records sha256 {str(recorded)[:12]}…)"
        )
    for name, size in card.get("files", {}).items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            raise MicronetError(f"{path} is missing or not the file the export wrote")
    needed = (
        ["model.onnx", "model_int8.onnx"] if set(runtimes) & {"onnxruntime", "openvino"} else []
    )
    needed += ["model.tflite", "model_int8.tflite"] if "litert" in runtimes else []
    missing = [name for name in needed if name not in card.get("files", {})]
    if missing:
        raise MicronetError(
            f"--onnx_dir {folder} has no {', '.join(missing)}: export with --bits=8x8"
            + (" --format=onnx,tflite" if "litert" in runtimes else "")
        )
    return card


def check_runtimes(runtimes: tuple[str, ...]) -> None:
    import importlib.util

    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise MicronetError(
            f"--runtimes: unknown {', '.join(unknown)}; known: {', '.join(RUNTIMES)}"
        )
    for runtime in runtimes:
        module = EXTRA.get(runtime)
        if module and importlib.util.find_spec(module) is None:
            raise MicronetError(f'--runtimes {runtime} needs {module}: pip install -e ".[export]"')


def build_runners(args, folder: Path, loaded, calibration: np.ndarray) -> list:
    exit_dir = folder / "early_exit"
    runners: list = []
    if "jax" in args.runtimes:
        runners.append(JaxRunner(loaded.model, loaded.variables))
    pairs = {
        "float32": ("model.onnx", exit_dir / "head.onnx", exit_dir / "tail.onnx"),
        "int8": ("model_int8.onnx", exit_dir / "head_int8.onnx", exit_dir / "tail_int8.onnx"),
    }
    if "onnxruntime" in args.runtimes:
        for precision, (full, head, tail) in pairs.items():
            runners.append(onnxruntime_runner(precision, folder / full, head, tail, args.threads))
        peer = static_peer(folder, calibration)
        runners.append(onnxruntime_runner("int8 quantize_static", peer, None, None, args.threads))
    if "openvino" in args.runtimes:
        for precision, hint, files in (
            ("float32", "f32", pairs["float32"]),
            ("bf16 (its default)", "bf16", pairs["float32"]),
            ("int8", "f32", pairs["int8"]),
        ):
            full, head, tail = files
            runners.append(
                openvino_runner(precision, hint, folder / full, head, tail, args.threads)
            )
    if "litert" in args.runtimes:
        runners.append(litert_runner("float32", folder, "", args.threads))
        if (folder / "model_sparse.tflite").exists():
            runners.append(litert_runner("float32 sparse-encoded", folder, "_sparse", args.threads))
        runners.append(litert_runner("int8", folder, "_int8", args.threads))
    return runners


def static_peer(folder: Path, calibration: np.ndarray) -> Path:
    """onnxruntime's own static int8 quantisation of model.onnx (per channel, MinMax on the
    same calibration images), built once (beside the export, under peer/)."""
    from micronet_jax.deploy.onnx_graph import static_quantize_peer

    path = folder / "peer" / "model_ort_static.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        static_quantize_peer(str(folder / "model.onnx"), str(path), calibration)
    return path


# --- the run ---------------------------------------------------------------------------------


def parser() -> CommandParser:
    cli = CommandParser(prog="python -m benchmarks.deploy", description=__doc__.splitlines()[0])
    cli.add_argument("--onnx_dir", default="runs/export", help="a micronet_jax.export folder")
    cli.add_argument("--checkpoint", default=str(CHECKPOINT), help="what the folder exports")
    cli.add_argument("--calibration", default=str(ARCHIVE), help="CIFAR-10 archive")
    cli.add_argument("--out", default="runs/deploy", help="deploy.json, .csv and .png go here")
    cli.add_argument(
        "--runtimes",
        default=",".join(RUNTIMES),
        type=lambda text: tuple(r.strip() for r in text.split(",") if r.strip()),
        help="comma-separated, of " + ", ".join(RUNTIMES),
    )
    cli.add_argument("--images", type=int, default=200, help="batch-1 images per repeat")
    cli.add_argument("--batch", type=int, default=256, help="the large batch")
    cli.add_argument("--batch_images", type=int, default=1024, help="images per batch run")
    cli.add_argument("--ratio", type=float, default=0.2929, help="share of images exiting")
    cli.add_argument("--repeats", type=int, default=5, help="alternating repeats")
    cli.add_argument("--threads", type=int, default=2, help="threads of every runtime")
    cli.add_argument(
        "--fidelity_images",
        type=int,
        default=10_000,
        help="test images each file's predictions are compared with JAX float32's on",
    )
    return cli


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    folder, checkpoint = Path(args.onnx_dir), Path(args.checkpoint)
    try:
        check_runtimes(args.runtimes)
        if not checkpoint.is_file():
            raise MicronetError(f"--checkpoint: no file at {checkpoint}")
        check_export(folder, checkpoint, args.runtimes)
    except MicronetError as error:
        fail(str(error))
    from micronet_jax import load_original

    images = cifar10_images(Path(args.calibration), "test", max(args.images, args.batch_images))
    loaded = load_original(checkpoint)
    runners = build_runners(
        args, folder, loaded, cifar10_images(Path(args.calibration), "train", 1024)
    )
    reference = JaxRunner(loaded.model, loaded.variables)
    exit_logits = reference.logits(images[: args.batch_images])[1]
    threshold = float(np.quantile(top_probability(exit_logits), 1.0 - args.ratio))
    rows = measure(runners, images, threshold, args)
    if args.fidelity_images > 0:
        test = cifar10_images(Path(args.calibration), "test", args.fidelity_images)
        add_fidelity(rows, runners, reference, test)
    sizes = {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.suffix in (".onnx", ".tflite") and "peer" not in p.parts
    }
    print(table(rows, args.batch))
    print(f"\nexit threshold {threshold:.3f}: {args.ratio:.1%} of the measured images exit")
    print("files: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items()))
    write_results(Path(args.out), rows, sizes, args)
    return 0


def measure(runners: list, images: np.ndarray, threshold: float, args) -> list[dict]:
    """Every runner's figures, alternating runners within each repeat (after a warm-up that
    compiles every program and plans every shape)."""
    modes = ("full", "exit")
    jobs = [
        (runner, mode)
        for runner in runners
        for mode in modes
        if mode == "full" or getattr(runner, "has_exit", True)
    ]

    def fn(runner, mode):
        return runner.full if mode == "full" else lambda x: runner.exit(x, threshold)

    for runner, mode in jobs:
        time_batch1(fn(runner, mode), images[:3])
        time_batches(fn(runner, mode), images[: args.batch], args.batch)
    batch1: dict = {id(j): [] for j in jobs}
    batch_n: dict = {id(j): [] for j in jobs}
    for repeat in range(args.repeats):
        for job in jobs:
            batch1[id(job)] += time_batch1(fn(*job), images[: args.images])
            batch_n[id(job)].append(time_batches(fn(*job), images[: args.batch_images], args.batch))
        print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    rows = []
    for job in jobs:
        runner, mode = job
        latencies = batch1[id(job)]
        rows.append(
            {
                "runtime": runner.runtime,
                "precision": runner.precision,
                "mode": mode,
                "batch1_median_ms": statistics.median(latencies),
                "batch1_p90_ms": float(np.percentile(latencies, 90)),
                "batch1_images_per_s": 1e3 / statistics.median(latencies),
                "batch_images_per_s": statistics.median(batch_n[id(job)]),
            }
        )
    add_ratios(rows)
    return rows


def add_fidelity(rows: list[dict], runners: list, reference, images: np.ndarray) -> None:
    """Each file's predictions against JAX float32's on `images` (both heads run): top-1
    agreement of the main head, on the confident images (top probability ≥ 0.5) and of the
    exit head, and the main head's mean KL divergence from float32, on its full-mode row."""
    from micronet_jax.evaluation.early_exit import logit_agreement

    def run(fn):
        parts = [fn(images[i : i + 500]) for i in range(0, len(images), 500)]
        return tuple(np.concatenate(p) for p in zip(*parts, strict=True))

    want = run(reference.outputs)
    for runner in runners:
        got = run(runner.outputs)
        agreement = logit_agreement(got, want)
        row = next(
            r
            for r in rows
            if (r["runtime"], r["precision"], r["mode"])
            == (runner.runtime, runner.precision, "full")
        )
        row["agreement_main"] = agreement["main"]
        row["agreement_confident"] = agreement["confident"]
        row["agreement_exit"] = agreement.get("exit")
        row["kl_main"] = kl_divergence(want[0], got[0])
        row["fidelity_images"] = len(images)
        print(
            f"fidelity {runner.runtime} {runner.precision}: main {agreement['main']:.2%}",
            file=sys.stderr,
            flush=True,
        )


def kl_divergence(reference: np.ndarray, logits: np.ndarray) -> float:
    """Mean KL(softmax(reference) ‖ softmax(logits)) over the images."""

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p_log, q_log = log_softmax(reference.astype(np.float64)), log_softmax(logits.astype(np.float64))
    return float(np.mean(np.sum(np.exp(p_log) * (p_log - q_log), -1)))


def add_ratios(rows: list[dict]) -> None:
    """Each row's speed against the same runtime's float32 and against JAX float32, in the
    same mode, at batch 1 and at the large batch."""

    def find(runtime, mode):
        return next(
            (
                r
                for r in rows
                if r["runtime"] == runtime and r["precision"] == "float32" and r["mode"] == mode
            ),
            None,
        )

    for row in rows:
        for base_name, base in (
            ("own_float32", find(row["runtime"], row["mode"])),
            ("jax_float32", find("JAX", row["mode"])),
        ):
            for key in ("batch1_images_per_s", "batch_images_per_s"):
                ratio = row[key] / base[key] if base else None
                row[f"{key.removesuffix('_images_per_s')}_vs_{base_name}"] = ratio


def table(rows: list[dict], batch: int) -> str:
    def ratio(value):
        return f"{value:.2f}×" if value is not None else "—"

    def share(value):
        return f"{value:.2%}" if value is not None else "—"

    lines = [
        f"| runtime | precision | mode | batch 1 median / p90 ms | batch {batch} images/s | "
        f"vs own float32 (1 / {batch}) | vs JAX float32 (1 / {batch}) | "
        "agreement main / confident / exit | KL |",
        "|" + "---|" * 9,
    ]
    for r in rows:
        kl = r.get("kl_main")
        lines.append(
            f"| {r['runtime']} | {r['precision']} | {r['mode']} | "
            f"{r['batch1_median_ms']:.2f} / {r['batch1_p90_ms']:.2f} | "
            f"{r['batch_images_per_s']:.0f} | "
            f"{ratio(r['batch1_vs_own_float32'])} / {ratio(r['batch_vs_own_float32'])} | "
            f"{ratio(r['batch1_vs_jax_float32'])} / {ratio(r['batch_vs_jax_float32'])} | "
            f"{share(r.get('agreement_main'))} / {share(r.get('agreement_confident'))} / "
            f"{share(r.get('agreement_exit'))} | {'—' if kl is None else f'{kl:.4f}'} |"
        )
    return "\n".join(lines)


def write_results(out: Path, rows: list[dict], sizes: dict, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "runtimes"}
    settings["runtimes"] = list(args.runtimes)
    (out / "deploy.json").write_text(
        json.dumps({"settings": settings, "rows": rows, "sizes": sizes}, indent=2) + "\n"
    )
    with open(out / "deploy.csv", "w", newline="") as f:
        fields = list(dict.fromkeys(key for row in rows for key in row))
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    plot(out / "deploy.png", rows, args.batch)


def plot(path: Path, rows: list[dict], batch: int) -> None:
    """Images/s of each runtime and precision, full network, at batch 1 and the large batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = [r for r in rows if r["mode"] == "full"]
    labels = [f"{r['runtime']}\n{r['precision']}" for r in full]
    x = np.arange(len(full))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(full)), 4))
    ax.bar(x - 0.2, [r["batch1_images_per_s"] for r in full], 0.4, label="batch 1")
    ax.bar(x + 0.2, [r["batch_images_per_s"] for r in full], 0.4, label=f"batch {batch}")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("images/s")
    ax.set_title("The released network, full graph, by runtime and precision")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
