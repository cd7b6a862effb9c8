"""Where the exported network's time goes, by operator type, in onnxruntime and OpenVINO.

    python -m benchmarks.deploy_profile --onnx_dir=runs/export [--batch 256] [--runs 4]

For `model.onnx` and `model_int8.onnx`: onnxruntime's profiler (`enable_profiling`, kernel
time by op type, over `--runs` calls after a warm-up) and OpenVINO's performance counters
(`PERF_COUNT`, CPU time by executed layer type, f32 precision), at batch `--batch`, each
runtime on `--threads` threads. Shows what an int8 graph leaves in float and what it costs.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np

from micronet_jax.errors import CommandParser


def parser() -> CommandParser:
    cli = CommandParser(
        prog="python -m benchmarks.deploy_profile", description=__doc__.splitlines()[0]
    )
    cli.add_argument("--onnx_dir", default="runs/export", help="a micronet_jax.export folder")
    cli.add_argument("--batch", type=int, default=256, help="images per call")
    cli.add_argument("--runs", type=int, default=4, help="profiled calls")
    cli.add_argument("--threads", type=int, default=2, help="threads of every runtime")
    cli.add_argument("--top", type=int, default=8, help="op types shown per graph")
    return cli


def onnxruntime_profile(path: Path, images: np.ndarray, runs: int, threads: int) -> dict:
    """Kernel microseconds per call by op type."""
    from micronet_jax.deploy.onnxruntime_session import session as open_session

    session = open_session(path, threads, inter_op_threads=1, profile=True)
    session.run(None, {"images": images})  # warm-up (profiled too: averaged in)
    for _ in range(runs):
        session.run(None, {"images": images})
    written = Path(session.end_profiling())
    events = json.loads(written.read_text())
    written.unlink()  # onnxruntime writes its profile into the working directory
    totals: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"].get("op_name", "?")] += event["dur"]
    return {op: micros / (runs + 1) for op, micros in totals.items()}  # the warm-up included


def openvino_profile(path: Path, images: np.ndarray, runs: int, threads: int) -> dict:
    """CPU microseconds per call by executed layer type (f32 precision)."""
    from micronet_jax.deploy import openvino_runtime

    config = {
        "INFERENCE_NUM_THREADS": threads,
        "INFERENCE_PRECISION_HINT": "f32",
        "PERF_COUNT": True,
    }
    request = openvino_runtime.compile_model(path, config).create_infer_request()
    request.infer({0: images})
    totals: collections.Counter = collections.Counter()
    for _ in range(runs):
        request.infer({0: images})
        for info in request.profiling_info:
            if info.status == info.Status.EXECUTED:
                totals[f"{info.node_type} ({info.exec_type})"] += (
                    info.cpu_time.total_seconds() * 1e6
                )
    return {op: value / runs for op, value in totals.items()}


def show(title: str, profile: dict, top: int) -> None:
    total = sum(profile.values())
    print(f"\n{title}: {total / 1e3:.1f} ms per call")
    for op, micros in sorted(profile.items(), key=lambda item: -item[1])[:top]:
        print(f"  {op:48s} {100 * micros / total:5.1f}%  {micros / 1e3:8.2f} ms")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    folder = Path(args.onnx_dir)
    images = np.random.default_rng(0).integers(0, 256, (args.batch, 32, 32, 3), dtype=np.uint8)
    for name in ("model.onnx", "model_int8.onnx"):
        path = folder / name
        show(
            f"onnxruntime {name}, batch {args.batch}",
            onnxruntime_profile(path, images, args.runs, args.threads),
            args.top,
        )
        show(
            f"OpenVINO {name}, batch {args.batch}",
            openvino_profile(path, images, args.runs, args.threads),
            args.top,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
