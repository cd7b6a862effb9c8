"""The raw jax2onnx graph against the cleaned deployment graph, in onnxruntime and OpenVINO.

    python -m benchmarks.onnx_graphs [--repeats 5] [--threads 2]

Both graphs of the released final network (float32, BN folded), built here from the
checkpoint: `onnx_graph.to_onnx` as jax2onnx writes it, and the same through
`onnx_clean.clean`. Batch `--batch` images/s, runtimes and graphs alternating within every
repeat, medians over repeats; the node count of each graph; the largest logit difference
between the two on the measured images.
"""

from __future__ import annotations

import collections
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.shared_data import checkpoint
from micronet_jax.errors import CommandParser

CHECKPOINT = checkpoint()


def parser() -> CommandParser:
    cli = CommandParser(
        prog="python -m benchmarks.onnx_graphs", description=__doc__.splitlines()[0]
    )
    cli.add_argument("--checkpoint", default=str(CHECKPOINT), help="one of the original's .pth")
    cli.add_argument("--batch", type=int, default=256, help="images per call")
    cli.add_argument("--repeats", type=int, default=5, help="alternating repeats")
    cli.add_argument("--threads", type=int, default=2, help="threads of every runtime")
    return cli


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import onnx

    from micronet_jax import fold_batch_norm, load_original
    from micronet_jax.deploy import onnx_graph, openvino_runtime
    from micronet_jax.deploy.onnx_clean import clean
    from micronet_jax.deploy.onnxruntime_session import session as open_session

    loaded = load_original(args.checkpoint)
    forward = onnx_graph.forward_fn(loaded.model, fold_batch_norm(loaded.variables))
    raw = onnx_graph.to_onnx(forward, ("N", 32, 32, 3), np.uint8, ["logits", "exit_logits"])
    graphs = {"jax2onnx": raw, "clean": clean(onnx.load_from_string(raw.SerializeToString()))}
    images = np.random.default_rng(0).integers(0, 256, (args.batch, 32, 32, 3), dtype=np.uint8)
    runners, outputs = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for name, proto in graphs.items():
            path = Path(folder) / f"{name}.onnx"
            onnx.save(proto, path)
            session = open_session(path, args.threads, inter_op_threads=1)
            runners["onnxruntime", name] = lambda x, s=session: s.run(None, {"images": x})
            config = {"INFERENCE_NUM_THREADS": args.threads, "INFERENCE_PRECISION_HINT": "f32"}
            request = openvino_runtime.compile_model(path, config).create_infer_request()
            runners["OpenVINO f32", name] = lambda x, r=request: list(r.infer({0: x}).values())
        for key, run in runners.items():
            outputs[key] = np.asarray(run(images)[0])  # also the warm-up
        speeds: dict = {key: [] for key in runners}
        for _ in range(args.repeats):
            for key, run in runners.items():
                tic = time.perf_counter()
                run(images)
                speeds[key].append(args.batch / (time.perf_counter() - tic))
    print("| runtime | graph | nodes | images/s | vs jax2onnx's graph |")
    print("|---|---|---|---|---|")
    for (runtime, name), values in speeds.items():
        base = statistics.median(speeds[runtime, "jax2onnx"])
        print(
            f"| {runtime} | {name} | {len(graphs[name].graph.node)} | "
            f"{statistics.median(values):.0f} | {statistics.median(values) / base:.2f}× |"
        )
    histogram = collections.Counter(node.op_type for node in graphs["clean"].graph.node)
    print("\nclean graph: " + ", ".join(f"{op} {n}" for op, n in histogram.most_common()))
    gap = max(
        float(np.max(np.abs(outputs[r, "clean"] - outputs[r, "jax2onnx"])))
        for r in ("onnxruntime", "OpenVINO f32")
    )
    print(f"largest logit difference between the two graphs: {gap:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
