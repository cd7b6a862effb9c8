"""Export a MicroNet for a real runtime (ONNX, run by onnxruntime), float32 and quantised.

    python -m micronet_jax.export --checkpoint=PATH --out=DIR [--bits=8x8]
        [--calibration=cifar-10-python.tar.gz] [--method=mse+adaround+bias]

PATH is one of the original's `.pth` files or a finished pipeline workdir. DIR gets:
- `model.onnx`: the float32 network (BN folded), input `images` (uint8, N×32×32×3, NHWC: raw
  CIFAR pixels; normalisation and upsampling inside), outputs `logits` and, with an exit
  head, `exit_logits`;
- with `--bits`, `model_int8.onnx`: the network quantised post-training by `--method` on
  training images of the calibration archive, its kernels stored as int8 codes
  (DequantizeLinear) and its layer inputs on their calibrated grids (QuantizeLinear /
  DequantizeLinear), exactly the grids and roundings of the JAX fake quantisation;
- `card.json`: what was exported and from what, the honest MicroNet score of the exported
  network, agreement and runtime parity measured on the archive's test images, file sizes.

DIR is written under a temporary name and renamed when complete; an existing DIR is refused
unless `--overwrite`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from micronet_jax.bitwidths import SCALE_WIDTHS
from micronet_jax.errors import CheckpointError, ConfigError, DataError, MicronetError

INT8_WIDTHS = range(2, 9)  # widths a code fits in int8 (kernels) and uint8 (inputs)
THRESHOLD = 0.85  # the recipe's exit threshold
CONTROL_IMAGES = 2000


def parse_bits(text: str, scale_bits: int = 32) -> Any:
    """'WxA' (weights x activations, each 2..8 bits; a depthwise conv's input on a grid per
    channel) or 'WxA/tensor' (one grid per depthwise input); scales at `scale_bits`."""
    from micronet_jax.bitwidths import BitWidths

    widths, _, grids = text.partition("/")
    weights, _, activations = widths.partition("x")
    if (
        grids not in ("", "tensor")
        or not weights.isdigit()
        or not activations.isdigit()
        or int(weights) not in INT8_WIDTHS
        or int(activations) not in INT8_WIDTHS
    ):
        raise ConfigError(
            f"--bits {text!r}: expected WxA or WxA/tensor with W and A in 2..8 (e.g. 8x8, 6x6, 4x8)"
        )
    return BitWidths(int(weights), int(activations), (), grids != "tensor", scale_bits)


def file_sha256(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def load_network(path: Path) -> tuple[Any, dict, dict[str, Any]]:
    """(model, variables, description) of a `.pth` of the original or a finished workdir."""
    if path.is_file():
        from micronet_jax.convert import load_original

        converted = load_original(path)
        return (
            converted.model,
            converted.variables,
            {
                "checkpoint": str(path),
                "name": path.parent.name + "/" + path.name,
                "sha256": file_sha256([path]),
            },
        )
    if path.is_dir():
        from micronet_jax import stages
        from micronet_jax.report import load_final_variables, load_run_config

        config = load_run_config(path)
        if config is None:
            raise CheckpointError(f"{path} is not a pipeline workdir (no config.json)")
        model, variables = load_final_variables(path, config)
        stage = stages.last_exit_stage(config, path)
        files = [f for f in (path / stage.name / "final").rglob("*") if f.is_file()]
        return (
            model,
            variables,
            {
                "checkpoint": str(path),
                "name": f"{path.name}/{stage.name}",
                "sha256": file_sha256(files),
            },
        )
    raise CheckpointError(f"--checkpoint: no file or directory at {path}")


def load_images(archive: Path, num_calibration: int, num_test: int):
    """(calibration images from the training split, measured images from the test split)."""
    from micronet_jax.data.cifar import load_train_test

    name = "cifar100" if "100" in archive.name else "cifar10"
    try:
        train, test = load_train_test(name, str(archive), download=False)
    except DataError as error:
        raise DataError(f"--calibration: {error}") from None
    return train.images[:num_calibration], test.images[:num_test]


def onnx_session(path: Path, threads: int = 0) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, images: np.ndarray, batch: int = 500) -> tuple[np.ndarray, ...]:
    outputs = [
        session.run(None, {"images": images[i : i + batch]}) for i in range(0, len(images), batch)
    ]
    return tuple(np.concatenate(parts) for parts in zip(*outputs, strict=True))


def agreement(
    got: tuple[np.ndarray, ...], reference: tuple[np.ndarray, ...], threshold: float = THRESHOLD
) -> dict[str, float]:
    """Top-1 agreement of each head and of the combined prediction at the exit threshold;
    `confident`: the main head's on images the reference is sure of."""
    from micronet_jax.inference import CONFIDENT, select_predictions, top_probability

    out = {"main": float(np.mean(got[0].argmax(-1) == reference[0].argmax(-1)))}
    sure = top_probability(reference[0]) >= CONFIDENT
    out["confident"] = float(np.mean((got[0].argmax(-1) == reference[0].argmax(-1))[sure]))
    if len(got) > 1:
        a = select_predictions(got[0], got[1], threshold)
        b = select_predictions(reference[0], reference[1], threshold)
        out["exit"] = float(np.mean(got[1].argmax(-1) == reference[1].argmax(-1)))
        out["combined"] = float(np.mean(a.predictions == b.predictions))
        out["exit_ratio"] = float(a.exit_ratio)
    out["max_logit_difference"] = float(np.max(np.abs(got[0] - reference[0])))
    return out


def export(args: argparse.Namespace) -> dict[str, Any]:
    """Write the files into a staging folder, then put it in place; the card."""
    out = Path(args.out)
    bits = parse_bits(args.bits, args.scale_bits) if args.bits else None
    if bits is not None and not args.calibration:
        raise ConfigError(
            "--bits needs --calibration (an archive whose training images set the grids)"
        )
    if out.exists() and not args.overwrite:
        raise ConfigError(f"--out {out} exists; pass --overwrite to replace it")
    from micronet_jax.ptq import parse_method

    method = parse_method(args.method)
    images = None
    if args.calibration:
        images = load_images(Path(args.calibration), args.num_calibration, args.num_test)
    model, variables, source = load_network(Path(args.checkpoint))
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        card = _write(staging, model, variables, bits, method, images, args)
        card["source"] = source
        (staging / "card.json").write_text(json.dumps(card, indent=2) + "\n")
        _put_in_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return card


def _put_in_place(staging: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _write(staging, model, variables, bits, method, images, args) -> dict[str, Any]:
    from micronet_jax import onnx_export
    from micronet_jax.models.fold import fold_batch_norm
    from micronet_jax.quantization import QuantizedApply
    from micronet_jax.scoring import count_micronet
    from micronet_jax.train.steps import predict

    outputs = ["logits", "exit_logits"] if model.arch.exit_head is not None else ["logits"]
    card: dict[str, Any] = {
        "format": f"ONNX, opset {onnx_export.OPSET}",
        "input": "images: uint8 N×32×32×3 (NHWC, raw pixels)",
        "outputs": outputs,
    }
    tic = time.perf_counter()
    folded = fold_batch_norm(variables)
    write_graphs(staging, model, folded, None, "", outputs)
    card["float32"] = {}
    ratio = None
    if images is not None:
        calibration, test = images
        card["measured_on"] = {
            "archive": str(args.calibration),
            "test_images": len(test),
        }
        reference = predict(model.apply, variables, test, 500)
        reference = tuple(r for r in reference if r is not None)
        runtime = run_onnx(onnx_session(staging / "model.onnx"), test)
        card["float32"]["onnx_vs_jax"] = agreement(runtime, reference)
        ratio = agreement(reference, reference).get("exit_ratio")
    card["float32"]["score"] = _score(count_micronet, model, folded["params"], ratio, None)
    if bits is not None:
        from tqdm.auto import tqdm

        from micronet_jax.ptq import post_training_quantize

        quantized, _ = post_training_quantize(
            model,
            variables,
            calibration,
            bits,
            method,
            progress=lambda total: tqdm(total=total, desc="quantise", leave=False),
        )
        write_graphs(staging, model, quantized, bits, "_int8", outputs)
        fake = predict(QuantizedApply(model, bits), quantized, test, 500)
        fake = tuple(r for r in fake if r is not None)
        runtime = run_onnx(onnx_session(staging / "model_int8.onnx"), test)
        versus_float = agreement(fake, reference)
        ratio = versus_float.get("exit_ratio")
        card["quantized"] = {
            "bits": args.bits,
            "widths": bits.describe(),
            "method": method.name,
            "calibration": {
                "archive": str(args.calibration),
                "split": "train",
                "images": len(calibration),
            },
            "score": _score(count_micronet, model, quantized["params"], ratio, bits),
            "agreement_with_float32": versus_float,
            "onnx_vs_jax_fake_quantisation": agreement(runtime, fake),
        }
        if args.num_control > 0:
            card["quantized"]["jax_xla_conv_vs_jax_fake_quantisation"] = _lowering_control(
                model, bits, quantized, test[: args.num_control], fake
            )
    card["files"] = {
        p.relative_to(staging).as_posix(): p.stat().st_size for p in sorted(staging.rglob("*.onnx"))
    }
    card["seconds"] = round(time.perf_counter() - tic, 1)
    return card


def _lowering_control(model, bits, quantized, images, fake) -> dict[str, Any]:
    """The same fake-quantised network in JAX with XLA's convolutions (the graph's) instead
    of the CPU's shifted sums: how far two lowerings of one network move predictions, the
    yardstick for the runtime's parity (the grids turn float rounding differences into
    whole steps wherever a value lies near a grid boundary)."""
    from micronet_jax import onnx_export
    from micronet_jax.quantization import QuantizedApply
    from micronet_jax.train.steps import predict

    apply = QuantizedApply(onnx_export.export_model(model), bits)
    other = tuple(r for r in predict(apply, quantized, images, 500) if r is not None)
    return agreement(other, tuple(f[: len(images)] for f in fake)) | {"images": len(images)}


def _score(count_micronet, model, params, ratio, bits) -> dict[str, Any]:
    """The honest MicroNet score: each tensor's real mask, BN as a bias, the exit ratio
    measured on the test images (none measured: no image exits)."""
    count = count_micronet(model.arch, params=params, exit_ratio=ratio, bn_as_bias=True, bits=bits)
    return {
        "total": count.score,
        "param": count.param_score,
        "math": count.math_score,
        "exit_ratio": ratio,
        "widths": count.widths,
        "counted": "real masks, BN as a bias, exit ratio measured on the test images",
    }


def write_graphs(folder: Path, model, variables, bits, suffix: str, outputs: list[str]) -> None:
    """model{suffix}.onnx and, with an exit head, the early-exit pair early_exit/head{suffix}
    (images -> exit logits, the exit block's features) and early_exit/tail{suffix} (features
    -> logits), for runtimes where the caller decides the exit."""
    import jax
    import onnx

    from micronet_jax import onnx_export

    images = ("N", 32, 32, 3)
    full = onnx_export.forward_fn(model, variables, bits)
    onnx.save(onnx_export.to_onnx(full, images, np.uint8, outputs), folder / f"model{suffix}.onnx")
    if model.arch.exit_head is None:
        return
    (folder / "early_exit").mkdir(exist_ok=True)
    head = onnx_export.forward_fn(model, variables, bits, part="head")
    proto = onnx_export.to_onnx(head, images, np.uint8, ["exit_logits", "features"])
    onnx.save(proto, folder / "early_exit" / f"head{suffix}.onnx")
    probe = jax.ShapeDtypeStruct((1, 32, 32, 3), np.uint8)
    features = jax.eval_shape(head, probe)[1]
    tail = onnx_export.forward_fn(model, variables, bits, part="tail")
    proto = onnx_export.to_onnx(
        tail, ("N", *features.shape[1:]), np.float32, ["logits"], input_name="features"
    )
    onnx.save(proto, folder / "early_exit" / f"tail{suffix}.onnx")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m micronet_jax.export", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--checkpoint", required=True, help="a .pth of the original or a workdir")
    parser.add_argument("--out", required=True, help="folder to write (must not exist)")
    parser.add_argument("--bits", default=None, help="WxA, e.g. 8x8: also write model_int8.onnx")
    parser.add_argument(
        "--calibration",
        default=None,
        help="CIFAR archive: training images calibrate, test images measure",
    )
    parser.add_argument(
        "--method",
        default="mse+adaround+bias",
        help="nearest, or '+'-joined mse (weight clipping), adaround, bias (correction)",
    )
    parser.add_argument(
        "--scale_bits",
        type=int,
        choices=SCALE_WIDTHS,
        default=32,
        help="scales and zero points as float16 values (16) or float32 (counted so)",
    )
    parser.add_argument("--num_calibration", type=int, default=1024)
    parser.add_argument("--num_test", type=int, default=10_000)
    parser.add_argument(
        "--num_control",
        type=int,
        default=CONTROL_IMAGES,
        help="test images for the control (the fake quantisation under XLA's convolutions "
        "against the CPU's; what two JAX lowerings disagree on); 0 skips it",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        card = export(args)
    except MicronetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(card, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
