"""Post-training quantisation of both released checkpoints: every method, every width, every
calibration source, and the mixed-precision frontier.

    python -m experiments.ptq --out=runs/ptq [--data=…/cifar-10-python.tar.gz]
        [--bits 8x8 6x6 4x8] [--methods nearest mse+bias mse+brecq+lsq+qdrop …]
        [--calibration cifar10 synthetic both] [--floors 0.97]

The defaults are sized to run both checkpoints in under an hour on 2 CPU cores; the costly
rows (AdaRound's 2,000 steps per layer, 400 reconstruction steps per segment as the export
uses, 16-bit-scale variants) are one option away.

BN folded into the convs, weights per output channel (symmetric), the input of every conv and
dense layer on an affine grid (a depthwise conv's input per channel, or per tensor with
`WxA/tensor`), calibrated on `--num_calibration` CIFAR-10 training images (`cifar10`), on
`--num_synthetic` images made from the network's BN statistics (`synthetic`: no data), or on
those and as many CIFAR-10 images (`both`); the
methods (`micronet_jax.quant.ptq`): rounding to nearest on max scales, MSE-chosen weight
clipping, bias correction, AdaRound's learned rounding, and the block reconstructions that
learn activation grids (lsq), the rounding of a whole block (brecq) and drop activations from
quantisation while learning (qdrop). The synthetic and combined calibrations are run at the
first width. Agreement is measured on the test images, which calibration never sees. Pruning
masks are kept exactly (a pruned weight is 0 on every grid). Each row gives top-1 agreement
with the float32 network on real CIFAR-10 test images (outside its classes, so agreement, not
accuracy; `confident_agreement` counts only the images the float32 network is sure of), the
mean KL divergence float32‖quantised of the main path's softmax, the overlap of the top-5
classes, and the honest MicroNet score: each tensor's real mask, BN counted as a bias, the exit
ratio measured at the recipe's threshold on these images, and at the ratio the checkpoint was
published with (CIFAR-100's). `--scale_bits 16` adds the last method's rows with float16
scales; `--peers` adds onnxruntime's own static int8 quantisation of the float32 export
(MinMax, Entropy, Percentile) at 8x8.

The frontier (`--floors`, `micronet_jax.quant.mixed`): per-layer widths (weights 4/6/8,
activations 8/16, scales 16-bit) chosen by Fisher sensitivity on held-out training images,
each configuration of the sweep quantised (`--frontier_method`) and measured on other
held-out training images; the configurations on the score–agreement frontier are then
measured on the test images, their width files written under `OUT/widths/`, and for each floor
the lowest-score configuration meeting it on the held-out images is marked.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from experiments import agreement
from micronet_jax import (
    BitWidths,
    QuantizedApply,
    calibrate,
    count_micronet,
    eval_transform,
    fold_batch_norm,
    post_training_quantize,
)
from micronet_jax.errors import CommandParser, ConfigError
from micronet_jax.quant import mixed
from micronet_jax.quant.ptq import parse_method
from micronet_jax.quant.reconstruct import Reconstruction
from micronet_jax.quant.widths import parse_bits, save_widths

DEFAULT_BITS = ("8x8", "6x6", "4x8")
DEFAULT_METHODS = ("nearest", "mse+bias", "mse+brecq+lsq+qdrop")
CALIBRATIONS = ("cifar10", "synthetic", "both")
DEFAULT_CALIBRATIONS = ("cifar10", "synthetic")
DEFAULT_RECONSTRUCTION_ITERATIONS = 100  # a quarter of the export's: the table's time budget
FRONTIER_BASE = "8x8"  # the sweep's starting widths (scales at 16 bits)
PEERS = ("MinMax", "Entropy", "Percentile")
# onnxruntime's histogram calibrators hold every intermediate output of every calibration
# image in memory (~24 MB an image for this network): 1,024 images do not fit in 24 GB
PEER_CALIBRATION = 256
COLUMNS = (
    "checkpoint",
    "bits",
    "calibration",
    "method",
    "main_agreement",
    "exit_agreement",
    "combined_agreement",
    "confident_agreement",
    "kl_divergence",
    "top5_overlap",
    "exit_ratio",
    "score_measured_ratio",
    "score_published_ratio",
    "param_score",
    "math_score_published_ratio",
    "seconds",
)
FRONTIER_COLUMNS = (
    "checkpoint",
    "configuration",
    "floor_met",
    "held_out_agreement",
    "main_agreement",
    "confident_agreement",
    "kl_divergence",
    "top5_overlap",
    "score_measured_ratio",
    "score_published_ratio",
    "wider_layers",
    "narrower_layers",
    "widths_file",
)


def honest_score(arch, params, bits: BitWidths, ratio: float):
    return count_micronet(arch, params=params, exit_ratio=ratio, bn_as_bias=True, bits=bits)


def measure(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """(the method × width × calibration rows, the frontier rows) of every checkpoint."""
    from micronet_jax import load_original

    images, train_images = agreement.measured_images(
        args.data, args.num_test, args.num_calibration + args.fisher_images + args.held_out
    )
    cifar10 = train_images[: args.num_calibration]
    held_out = train_images[args.num_calibration :]
    if args.floors and len(held_out) < args.fisher_images + args.held_out:
        raise SystemExit(
            f"error: the mixed-precision search needs {args.fisher_images} + {args.held_out} "
            f"training images beyond the {args.num_calibration} calibration images, and the "
            f"archive has {len(held_out)} more: lower --fisher_images/--held_out, or pass "
            "--floors with no value (no search)"
        )
    rows, frontier_rows = [], []
    for name in args.only or agreement.CHECKPOINTS:
        loaded = load_original(agreement.checkpoint_path(args.checkpoints, name))
        model, variables = loaded.model, loaded.variables
        reference = agreement.run(model.apply, variables, images, args.batch_size)
        published = agreement.PUBLISHED_RATIO[name]
        float_count = honest_score(loaded.arch, variables["params"], BitWidths(), published)
        rows.append(
            {"checkpoint": name, "bits": "float32 (16-bit freebie)", "method": ""}
            | _scores(float_count, None, published)
        )
        sources = calibration_sets(args.calibration, model, variables, cifar10, args.num_synthetic)
        cifar10_histograms = None  # the search calibrates on them too
        for source, calibration_images in sources.items():
            histograms = histograms_of(model, variables, calibration_images)
            if source == "cifar10":
                cifar10_histograms = histograms
            widths = args.bits if source == "cifar10" else args.bits[:1]
            runs = [(text, method, 32) for text in widths for method in args.methods]
            if source == "cifar10":
                runs += [(t, args.methods[-1], b) for t in widths for b in args.scale_bits]
            for text, method_text, scale_bits in runs:
                row = {"checkpoint": name, "calibration": _source_label(source, sources)}
                row |= quantised_row(
                    loaded,
                    published,
                    (calibration_images, histograms),
                    images,
                    reference,
                    args,
                    text,
                    method_text,
                    scale_bits,
                )
                rows.append(row)
                print(agreement.proxy.markdown_table([row], COLUMNS).splitlines()[-1], flush=True)
                release_compiled()
        if args.peers:
            rows += peer_rows(name, loaded, cifar10, images, reference, args)
        if args.floors:
            if cifar10_histograms is None:
                cifar10_histograms = histograms_of(model, variables, cifar10)
            calibration = (cifar10, cifar10_histograms)
            frontier_rows += frontier_sweep(
                name, loaded, calibration, held_out, images, reference, args
            )
    return rows, frontier_rows


def release_compiled() -> None:
    """Drops the programs compiled so far. Each row compiles its own (every reconstruction
    segment, every width's fake-quantised network), and a whole table's worth of them
    exhausted the process's memory mappings (LLVM: "Cannot allocate memory", then a crash)
    in the frontier's compile."""
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


def calibration_sets(
    names, model, variables, cifar10: np.ndarray, num_synthetic: int
) -> dict[str, np.ndarray]:
    """The calibration images of each requested source (synthetic ones made once)."""
    from micronet_jax.quant.synthetic import synthesise

    synthetic = None
    if {"synthetic", "both"} & set(names):
        tic = time.perf_counter()
        synthetic = synthesise(model, variables, num_synthetic)
        print(
            f"synthetic calibration: {len(synthetic)} images in {time.perf_counter() - tic:.0f} s",
            flush=True,
        )
    out = {}
    for name in names:
        if name == "cifar10":
            out[name] = cifar10
        elif name == "synthetic":
            out[name] = synthetic
        else:  # both: the synthetic images and as many CIFAR-10 ones
            out[name] = np.concatenate([cifar10[: len(synthetic)], synthetic])
    return out


def _source_label(source: str, sources: dict[str, np.ndarray]) -> str:
    return f"{source} ({len(sources[source])})"


def histograms_of(model, variables, images: np.ndarray):
    """The activation histograms of the BN-folded network on calibration `images` (shared by
    every method and width calibrated on them)."""
    batches = [images[i : i + 64] for i in range(0, len(images), 64)]
    return calibrate(model, fold_batch_norm(variables), batches, eval_transform)


def quantise(loaded, calibration, bits: BitWidths, method_text: str, args) -> dict:
    """The checkpoint post-training quantised on `calibration` = (images, their histograms)."""
    calibration_images, histograms = calibration
    quantized, _ = post_training_quantize(
        loaded.model,
        loaded.variables,
        calibration_images,
        bits,
        parse_method(method_text),
        calibration=histograms,
        iterations=args.iterations,
        reconstruction=Reconstruction(iterations=args.reconstruction_iterations),
    )
    return quantized


def quantised_row(
    loaded,
    published: float,
    calibration,
    images,
    reference,
    args,
    text,
    method_text,
    scale_bits,
) -> dict:
    """One post-training quantisation, measured on the test images and scored (at the exit
    ratio measured there, and at the `published` one)."""
    tic = time.perf_counter()
    model = loaded.model
    bits = parse_bits(text, args.keep, scale_bits)
    quantized = quantise(loaded, calibration, bits, method_text, args)
    got = agreement.run(QuantizedApply(model, bits), quantized, images, args.batch_size)
    label = text + "".join(f" {k}" for k in args.keep)
    label += f", scales {scale_bits}-bit" if scale_bits != 32 else ""
    row = {"bits": label, "method": method_text}
    row |= agreement.agreement(got, reference)
    params = quantized["params"]
    measured = honest_score(loaded.arch, params, bits, row["exit_ratio"])
    row |= _scores(honest_score(loaded.arch, params, bits, published), measured, published)
    row["seconds"] = time.perf_counter() - tic
    return row


def frontier_sweep(name, loaded, calibration, held_out, images, reference, args) -> list[dict]:
    """The mixed-precision sweep of one checkpoint (see the module docstring), calibrated on
    `calibration` = (CIFAR-10 images, their histograms): its frontier measured on the test
    images, one row per configuration, width files written."""
    tic = time.perf_counter()
    model, variables = loaded.model, loaded.variables
    fisher_images, proxy_images = held_out[: args.fisher_images], held_out[args.fisher_images :]
    base = parse_bits(FRONTIER_BASE, (), 16)
    histograms = calibration[1]
    info = mixed.fisher(model, variables, fisher_images)
    params = fold_batch_norm(variables)["params"]
    published = agreement.PUBLISHED_RATIO[name]

    def score(bits: BitWidths) -> float:
        return honest_score(loaded.arch, params, bits, published).score

    table = mixed.option_table(info, params, histograms.ranges(base), base, score)
    candidates = mixed.sweep(table, base, mixed.multipliers(table, args.sweep_points))
    print(
        f"{name}: {len(candidates)} configurations on the sweep "
        f"({time.perf_counter() - tic:.0f} s for the Fisher information and the options)"
    )
    proxy_reference = agreement.run(model.apply, variables, proxy_images, args.batch_size)
    quantized_by = {}

    def measure(bits: BitWidths) -> dict:
        quantized = quantise(loaded, calibration, bits, args.frontier_method, args)
        quantized_by[bits] = quantized
        got = agreement.run(QuantizedApply(model, bits), quantized, proxy_images, args.batch_size)
        score_now = honest_score(loaded.arch, quantized["params"], bits, published).score
        return {"score": score_now} | agreement.agreement(got, proxy_reference)

    chosen = {}
    for floor in sorted(args.floors):
        best, measured = mixed.search(candidates, measure, floor)
        chosen[floor] = best
    rows = []
    out = Path(args.out) / "widths"
    for index, candidate in enumerate(mixed.pareto_frontier(measured)):
        bits = candidate.bits
        quantized = quantized_by[bits]
        got = agreement.run(QuantizedApply(model, bits), quantized, images, args.batch_size)
        row = {"checkpoint": name, "configuration": index}
        row |= agreement.agreement(got, reference)
        measured_ratio = honest_score(loaded.arch, quantized["params"], bits, row["exit_ratio"])
        at_published = honest_score(loaded.arch, quantized["params"], bits, published)
        row |= _scores(at_published, measured_ratio, published)
        row["held_out_agreement"] = candidate.measured["main_agreement"]
        row["floor_met"] = " ".join(f"{f:g}" for f, c in chosen.items() if c is candidate)
        row["wider_layers"] = _layers(bits, lambda w, a: w > base.weights or a > base.activations)
        row["narrower_layers"] = _layers(bits, lambda w, a: w < base.weights)
        row["widths_file"] = str(save_widths(out / f"{name}_{index}.json", bits))
        rows.append(row)
        print(agreement.proxy.markdown_table([row], FRONTIER_COLUMNS).splitlines()[-1], flush=True)
    print(f"{name}: frontier in {time.perf_counter() - tic:.0f} s", flush=True)
    return rows


def _layers(bits: BitWidths, select) -> str:
    """'path w/a' of the overridden layers `select(weights, activations)` picks."""
    return ", ".join(
        f"{prefix.removesuffix('/kernel')} {w}/{a}"
        for prefix, w, a in bits.overrides
        if select(w, a)
    )


def peer_rows(name, loaded, calibration_images, images, reference, args) -> list[dict]:
    """onnxruntime's own static int8 quantisation of the float32 export, at 8x8."""
    import onnx

    from micronet_jax.deploy import onnx_graph
    from micronet_jax.deploy.onnxruntime_session import session as open_session

    rows = []
    variables = fold_batch_norm(loaded.variables)
    forward = onnx_graph.forward_fn(loaded.model, variables)
    outputs = ["logits", "exit_logits"]
    with tempfile.TemporaryDirectory() as tmp:
        float_path = str(Path(tmp) / "model.onnx")
        onnx.save(onnx_graph.to_onnx(forward, ("N", 32, 32, 3), np.uint8, outputs), float_path)
        for peer in PEERS:
            tic = time.perf_counter()
            path = str(Path(tmp) / f"{peer}.onnx")
            peer_images = calibration_images[:PEER_CALIBRATION]
            onnx_graph.static_quantize_peer(float_path, path, peer_images, peer)
            session = open_session(path)
            parts = [
                session.run(None, {"images": images[i : i + args.batch_size]})
                for i in range(0, len(images), args.batch_size)
            ]
            got = agreement.Outputs(*(np.concatenate(p) for p in zip(*parts, strict=True)))
            row = {
                "checkpoint": name,
                "bits": "8x8 (onnxruntime quantize_static, per channel)",
                "method": f"onnxruntime {peer} ({len(peer_images)} calibration images)",
            }
            row |= agreement.agreement(got, reference)
            row["seconds"] = time.perf_counter() - tic
            rows.append(row)
            print(agreement.proxy.markdown_table([row], COLUMNS).splitlines()[-1], flush=True)
    return rows


def _scores(at_published, at_measured, ratio: float) -> dict:
    out = {
        "score_published_ratio": at_published.score,
        "param_score": at_published.param_score,
        "math_score_published_ratio": at_published.math_score,
        "published_ratio": ratio,
    }
    if at_measured is not None:
        out["score_measured_ratio"] = at_measured.score
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = CommandParser(prog="python -m experiments.ptq", description=__doc__.splitlines()[0])
    agreement.add_common_args(parser)
    parser.add_argument(
        "--bits",
        nargs="+",
        default=list(DEFAULT_BITS),
        help="WxA, e.g. 8x8 (or 8x8/tensor: one grid per depthwise input)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        help="nearest, or '+'-joined mse, adaround or brecq, bias, lsq, qdrop (the last one is "
        "also run with --scale_bits)",
    )
    parser.add_argument(
        "--scale_bits",
        nargs="*",
        type=int,
        default=[],
        help="extra rows of the last method with scales at these bits, e.g. 16",
    )
    parser.add_argument(
        "--keep", nargs="*", default=[], help="overrides, e.g. stem_conv=8,32 fc=8,32"
    )
    parser.add_argument("--num_calibration", type=int, default=1024)
    parser.add_argument(
        "--only", nargs="*", choices=agreement.CHECKPOINTS, help="these checkpoints (default: both)"
    )
    parser.add_argument("--iterations", type=int, default=2000, help="AdaRound's, per layer")
    parser.add_argument(
        "--reconstruction_iterations",
        type=int,
        default=DEFAULT_RECONSTRUCTION_ITERATIONS,
        help=f"lsq / brecq: Adam steps per segment (the export's: {Reconstruction().iterations})",
    )
    parser.add_argument(
        "--calibration",
        nargs="+",
        choices=CALIBRATIONS,
        default=list(DEFAULT_CALIBRATIONS),
        help="calibration images: CIFAR-10 training images, synthetic ones (from the BN "
        "statistics), or both; the last two at the first --bits only",
    )
    parser.add_argument(
        "--num_synthetic", type=int, default=256, help="synthetic calibration images"
    )
    parser.add_argument(
        "--floors",
        nargs="*",
        type=float,
        default=[0.97],
        help="agreement floors of the mixed-precision search (none: no frontier)",
    )
    parser.add_argument(
        "--frontier_method", default="mse", help="the search's post-training quantisation"
    )
    parser.add_argument(
        "--held_out", type=int, default=1000, help="held-out training images the search measures"
    )
    parser.add_argument(
        "--fisher_images",
        type=int,
        default=256,
        help="held-out training images the layers' Fisher sensitivities are estimated on",
    )
    parser.add_argument("--sweep_points", type=int, default=6, help="multipliers swept")
    parser.add_argument(
        "--peers", action="store_true", help="add onnxruntime's quantize_static rows (8x8)"
    )
    args = parser.parse_args(argv)
    for text in args.methods + [args.frontier_method]:
        parse_method(text)  # a bad method or width fails now, not an hour in
    for text in args.bits:
        try:
            parse_bits(text, args.keep)
        except ConfigError as error:
            parser.error(str(error))
    tic = time.perf_counter()
    rows, frontier_rows = measure(args)
    minutes = (time.perf_counter() - tic) / 60
    notes = [
        f"{args.num_test:,} real CIFAR-10 test images (agreement with the float32 network); "
        f"calibration on {args.num_calibration:,} training images of CIFAR-10, or "
        f"{args.num_synthetic:,} synthetic ones made from the network's BN statistics, or "
        f"those and {args.num_synthetic:,} CIFAR-10 ones; reconstruction "
        f"{args.reconstruction_iterations} steps per segment; "
        "scores: real masks, BN as bias, upsample not counted. Command: "
        f"`python -m experiments.ptq`; {minutes:.0f} minutes in all.",
    ]
    title = "Post-training quantisation of the released checkpoints"
    print(agreement.write(Path(args.out), "ptq", title, notes, rows, COLUMNS))
    if frontier_rows:
        frontier_notes = [
            f"Per-layer widths by Fisher sensitivity ({args.fisher_images} held-out training "
            f"images), from {FRONTIER_BASE} with 16-bit scales: weights 4/6/8, activations "
            f"8/16; each configuration quantised by {args.frontier_method} and measured on "
            f"{args.held_out:,} other held-out training images (held_out_agreement); the "
            "frontier's configurations then on the test images. floor_met: the lowest-score "
            "configuration at or above that floor on the held-out images.",
        ]
        title = "Mixed precision: the score–agreement frontier"
        print(
            agreement.write(
                Path(args.out), "frontier", title, frontier_notes, frontier_rows, FRONTIER_COLUMNS
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
