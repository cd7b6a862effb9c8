"""The exported network in a real runtime: latency and throughput side by side, in one run.

    python -m benchmarks.deploy [--onnx_dir=runs/export] [--images 200] [--repeats 5]

Rows: JAX float32 (the project's own CPU inference), onnxruntime float32 (model.onnx),
onnxruntime int8 (model_int8.onnx: the project's grids, QDQ) and, as a peer, onnxruntime's
own static int8 quantisation of model.onnx (`quantize_static`, per channel, MinMax on the same
calibration images: integer kernels end to end). Each at batch 1 (median and p90 latency over
`--images` real CIFAR-10 test images, one at a time) and batch 256, with both heads on every
image ("full") and with the early exit decided in the caller ("exit": the exit head's graph
runs first, the tail's graph only on the images that did not exit). The exit threshold is set
so that `--ratio` of the measured images exit (CIFAR-10 is not the network's data; at the
recipe's 0.85 only about 3% would). Runtimes alternate within every repeat; figures are
medians over repeats. Thread counts: onnxruntime intra-op `--threads` (default: every core),
JAX its default (every core).

The ONNX files are built (`micronet_jax.export`) into `--onnx_dir` when absent there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from micronet_jax.evaluation.early_exit import top_probability

SHARED = Path(__file__).resolve().parents[2] / "shared"
CHECKPOINT = SHARED / "reference" / "osi_ai" / "final_ee50" / "trained_model.pth"
ARCHIVE = SHARED / "data" / "cifar-10-python.tar.gz"


def ensure_exported(args: argparse.Namespace) -> Path:
    out = Path(args.onnx_dir)
    needed = ["model.onnx", "model_int8.onnx", "early_exit/head.onnx", "early_exit/tail_int8.onnx"]
    if all((out / name).exists() for name in needed):
        return out
    from micronet_jax.deploy.export import ExportOptions, export

    print(f"building the ONNX files into {out} (micronet_jax.export) ...", flush=True)
    export(
        ExportOptions(
            checkpoint=str(args.checkpoint),
            out=str(out),
            bits="8x8",
            calibration=str(args.calibration),
            num_test=2000,
            overwrite=True,
        )
    )
    return out


def test_images(archive: Path, count: int) -> np.ndarray:
    from micronet_jax.data.cifar import load_train_test

    _, test = load_train_test("cifar10", str(archive), download=False)
    return test.images[:count]


def calibration_images(archive: Path, count: int) -> np.ndarray:
    from micronet_jax.data.cifar import load_train_test

    train, _ = load_train_test("cifar10", str(archive), download=False)
    return train.images[:count]


class OnnxRunner:
    """One precision in onnxruntime: the whole graph, and the early-exit pair."""

    def __init__(self, full: Path, head: Path | None, tail: Path | None, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1

        def session(path):
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        self.full_session = session(full)
        self.head_session = session(head) if head else None
        self.tail_session = session(tail) if tail else None

    def full(self, images: np.ndarray) -> np.ndarray:
        logits, exit_logits = self.full_session.run(None, {"images": images})
        return logits, exit_logits

    def exit(self, images: np.ndarray, threshold: float) -> np.ndarray:
        exit_logits, features = self.head_session.run(None, {"images": images})
        exited = top_probability(exit_logits) > threshold
        predictions = exit_logits.argmax(-1)
        if not exited.all():
            rest = self.tail_session.run(None, {"features": features[~exited]})[0]
            predictions[~exited] = rest.argmax(-1)
        return predictions


class JaxRunner:
    """The project's own float32 CPU inference: the jitted network, and for early exit the
    head and tail programs (batch 1) or `exit_predict_fast` (batches)."""

    def __init__(self, model, variables) -> None:
        import jax

        from micronet_jax.data.augment import eval_transform
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

    def full(self, images):
        logits, exit_logits = self._full(images)
        return np.asarray(logits), np.asarray(exit_logits)

    def exit(self, images, threshold):
        from micronet_jax.evaluation.early_exit import exit_predict_fast

        if len(images) > 1:
            return exit_predict_fast(
                self.model, self.variables, images, threshold, batch_size=len(images)
            ).predictions
        exit_logits, features = self._head(images)
        exit_logits = np.asarray(exit_logits)
        if top_probability(exit_logits)[0] > threshold:
            return exit_logits.argmax(-1)
        return np.asarray(self._tail(features)).argmax(-1)


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


def static_peer(onnx_dir: Path, calibration: np.ndarray) -> Path:
    """onnxruntime's own static int8 quantisation of model.onnx (per channel, MinMax on the
    same calibration images), built once."""
    from micronet_jax.deploy.onnx_graph import static_quantize_peer

    path = onnx_dir / "peer" / "model_ort_static.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        static_quantize_peer(str(onnx_dir / "model.onnx"), str(path), calibration)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.deploy", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--onnx_dir", default="runs/export")
    parser.add_argument("--checkpoint", default=str(CHECKPOINT))
    parser.add_argument("--calibration", default=str(ARCHIVE))
    parser.add_argument("--images", type=int, default=200, help="batch-1 images per repeat")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batch_images", type=int, default=1024, help="images per batch run")
    parser.add_argument("--ratio", type=float, default=0.2929, help="share of images exiting")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    from micronet_jax.models.torch_import import load_original

    onnx_dir = ensure_exported(args)
    images = test_images(Path(args.calibration), max(args.images, args.batch_images))
    loaded = load_original(args.checkpoint)
    jax_runner = JaxRunner(loaded.model, loaded.variables)
    exit_dir = onnx_dir / "early_exit"
    runners = {
        "JAX float32": jax_runner,
        "onnxruntime float32": OnnxRunner(
            onnx_dir / "model.onnx", exit_dir / "head.onnx", exit_dir / "tail.onnx", args.threads
        ),
        "onnxruntime int8 (ours, QDQ)": OnnxRunner(
            onnx_dir / "model_int8.onnx",
            exit_dir / "head_int8.onnx",
            exit_dir / "tail_int8.onnx",
            args.threads,
        ),
        "onnxruntime int8 (quantize_static)": OnnxRunner(
            static_peer(onnx_dir, calibration_images(Path(args.calibration), 1024)),
            None,
            None,
            args.threads,
        ),
    }
    _, exit_logits = jax_runner.full(images[: args.batch_images])
    threshold = float(np.quantile(top_probability(exit_logits), 1.0 - args.ratio))
    modes = ("full", "exit")
    b1: dict = {(r, m): [] for r in runners for m in modes}
    bn: dict = {(r, m): [] for r in runners for m in modes}
    for runner in runners.values():  # warm-up: every program compiled, every shape planned
        runner.full(images[:1])
        runner.full(images[: args.batch])
        if getattr(runner, "head_session", True) is not None:
            time_batch1(lambda x, r=runner: r.exit(x, threshold), images[: args.images])
            time_batches(lambda x, r=runner: r.exit(x, threshold), images, args.batch)
    for repeat in range(args.repeats):
        for name, runner in runners.items():
            for mode in modes:
                if mode == "exit" and getattr(runner, "head_session", True) is None:
                    continue
                fn = runner.full if mode == "full" else lambda x, r=runner: r.exit(x, threshold)
                b1[name, mode] += time_batch1(fn, images[: args.images])
                bn[name, mode].append(time_batches(fn, images[: args.batch_images], args.batch))
        print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)
    rows = []
    for name in runners:
        for mode in modes:
            if not bn[name, mode]:
                continue
            latencies = b1[name, mode]
            rows.append(
                {
                    "runtime": name,
                    "mode": mode,
                    "batch1_median_ms": statistics.median(latencies),
                    "batch1_p90_ms": float(np.percentile(latencies, 90)),
                    "batch1_images_per_s": 1e3 / statistics.mean(latencies),
                    f"batch{args.batch}_images_per_s": statistics.median(bn[name, mode]),
                }
            )
    sizes = {
        p.relative_to(onnx_dir).as_posix(): p.stat().st_size
        for p in sorted(onnx_dir.rglob("*.onnx"))
    }
    print(table(rows, args.batch))
    print(f"\nexit threshold {threshold:.3f}: {args.ratio:.1%} of the measured images exit")
    print("files: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "sizes": sizes}, indent=2))
    return 0


def table(rows: list[dict], batch: int) -> str:
    head = (
        f"| runtime | mode | batch 1 median ms | batch 1 p90 ms | batch 1 images/s | "
        f"batch {batch} images/s | vs JAX float32 (batch {batch}) |"
    )
    lines = [head, "|" + "---|" * 7]
    base = {
        r["mode"]: r[f"batch{batch}_images_per_s"] for r in rows if r["runtime"] == "JAX float32"
    }
    for r in rows:
        speed = r[f"batch{batch}_images_per_s"]
        lines.append(
            f"| {r['runtime']} | {r['mode']} | {r['batch1_median_ms']:.2f} | "
            f"{r['batch1_p90_ms']:.2f} | {r['batch1_images_per_s']:.0f} | {speed:.0f} | "
            f"{speed / base.get(r['mode'], base['full']):.2f}× |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
