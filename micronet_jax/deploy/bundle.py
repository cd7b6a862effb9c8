"""Export a MicroNet for the CPU runtimes people deploy with, float32 and quantised: the
library behind `python -m micronet_jax.export`.

The checkpoint is one of the original's `.pth` files or a finished pipeline workdir. The
output folder gets:
- `model.onnx`: the float32 network as a clean deployment graph (`onnx_clean`: BN folded,
  one layout, about one node per operation), input `images` (uint8, N×32×32×3, NHWC: raw
  CIFAR pixels; normalisation and upsampling inside), outputs `logits` and, with an exit
  head, `exit_logits`;
- with `bits`, `model_int8.onnx`: the network quantised post-training by `method` on
  training images of the calibration archive; at 8x8 the integer graph (`onnx_int8`: every
  tensor on an 8-bit grid, run by onnxruntime's integer kernels), at other widths the QDQ
  graph of the JAX fake quantisation itself;
- with `formats` including tflite, the LiteRT models (`tflite`): `model.tflite`,
  `model_sparse.tflite` and, with `bits` 8x8, the full-integer `model_int8.tflite`;
- the early-exit pair of each (`early_exit/head*`, `early_exit/tail*`);
- `card.json`: what was exported and from what, the honest MicroNet score of the exported
  network, agreement with float32 and each runtime's parity with the JAX side of its file,
  measured on the archive's test images; file sizes.

The folder is written under a temporary name and renamed when complete; an existing one is
refused unless `overwrite`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from micronet_jax.deploy.integer_learn import LearnOptions
from micronet_jax.deploy.onnxruntime_session import file_sha256, session
from micronet_jax.errors import CheckpointError, ConfigError, DataError
from micronet_jax.quant.widths import parse_bits

CONTROL_IMAGES = 2000
SYNTHETIC = "synthetic"  # --calibration: images made from the network's BN statistics


def load_network(path: Path) -> tuple[Any, dict, dict[str, Any]]:
    """(model, variables, description) of a `.pth` of the original or a finished workdir."""
    if path.is_file():
        from micronet_jax.models.torch_import import load_original

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
        from micronet_jax.recipe import stages
        from micronet_jax.recipe.run_plots import load_final_variables, load_run_config

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


def load_images(archive: Path, num_calibration: int, num_test: int, num_learn: int = 0):
    """(calibration images from the training split, measured images from the test split,
    images to learn the integer network from: the first `num_learn` training images)."""
    from micronet_jax.data.cifar import load_train_test

    name = "cifar100" if "100" in archive.name else "cifar10"
    try:
        train, test = load_train_test(name, str(archive), download=False)
    except DataError as error:
        raise DataError(f"--calibration: {error}") from None
    return (
        train.images[:num_calibration],
        test.images[:num_test],
        train.images[: max(num_learn, num_calibration)],
    )


def synthetic_images(model, variables, count: int) -> np.ndarray:
    """`count` calibration images made from the network's BN statistics (`quant.synthetic`),
    seeded: no data set needed, nothing measured."""
    from tqdm.auto import tqdm

    from micronet_jax.quant.synthetic import synthesise

    return synthesise(
        model,
        variables,
        count,
        progress=lambda total: tqdm(total=total, desc="synthesise calibration", leave=False),
    )


def run_onnx(session: Any, images: np.ndarray, batch: int = 500) -> tuple[np.ndarray, ...]:
    outputs = [
        session.run(None, {"images": images[i : i + batch]}) for i in range(0, len(images), batch)
    ]
    return tuple(np.concatenate(parts) for parts in zip(*outputs, strict=True))


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """What `export` writes, from what (the flags of `python -m micronet_jax.export`)."""

    checkpoint: str  # a .pth of the original or a finished workdir
    out: str  # the folder to write
    bits: str | None = None  # 'WxA' (e.g. 8x8): also write model_int8.onnx
    # a CIFAR archive (train images calibrate, test images measure) or "synthetic"
    calibration: str | None = None
    method: str = "mse+adaround+bias"
    scale_bits: int = 32
    num_calibration: int = 1024
    num_test: int = 10_000
    num_control: int = CONTROL_IMAGES
    overwrite: bool = False
    formats: tuple[str, ...] = ("onnx",)  # onnx, tflite
    learn_steps: int = LearnOptions.steps  # at 8x8: learning the integer network
    num_learn: int = 10_000  # training images it learns from


FORMATS = ("onnx", "tflite")


def write_bundle(options: ExportOptions) -> dict[str, Any]:
    """Check the options, write the files into a staging folder, put it in place; the card."""
    out = Path(options.out)
    bits = parse_bits(options.bits, (), options.scale_bits) if options.bits else None
    if bits is not None and not options.calibration:
        raise ConfigError(
            "--bits needs --calibration (an archive whose training images set the grids)"
        )
    if out.exists() and not options.overwrite:
        raise ConfigError(f"--out {out} exists; pass --overwrite to replace it")
    _check_formats(options, bits)
    from micronet_jax.quant.ptq import parse_method

    method = parse_method(options.method)
    if options.learn_steps < 0 or options.num_learn < 0:
        raise ConfigError("--learn_steps and --num_learn must be 0 or more")
    images = None
    if options.calibration and options.calibration != SYNTHETIC:
        images = load_images(
            Path(options.calibration), options.num_calibration, options.num_test, options.num_learn
        )
    model, variables, source = load_network(Path(options.checkpoint))
    if options.calibration == SYNTHETIC:
        synthetic = synthetic_images(model, variables, options.num_calibration)
        images = (synthetic, None, synthetic)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        card = _write(staging, model, variables, bits, method, images, options)
        card["source"] = source
        (staging / "card.json").write_text(json.dumps(card, indent=2) + "\n")
        _put_in_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return card


def _check_formats(options: ExportOptions, bits: Any) -> None:
    unknown = [f for f in options.formats if f not in FORMATS]
    if unknown or not options.formats:
        raise ConfigError(
            f"--format {','.join(options.formats)!r}: expected a comma-separated list of "
            f"{', '.join(FORMATS)}"
        )
    if "tflite" not in options.formats:
        return
    if bits is not None and not integer_eligible(bits):
        raise ConfigError(
            f"--format tflite: LiteRT's int8 model is 8-bit throughout; --bits {options.bits} "
            "needs --format onnx"
        )
    from micronet_jax.deploy.tflite import require_tensorflow

    require_tensorflow()


def _put_in_place(staging: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _write(staging, model, variables, bits, method, images, options) -> dict[str, Any]:
    """Every file and the card (without its source): the float32 graphs, then, with `bits`,
    the quantised ones."""
    from micronet_jax.deploy import onnx_graph

    outputs = ["logits", "exit_logits"] if model.arch.exit_head is not None else ["logits"]
    card: dict[str, Any] = {
        "format": f"ONNX, opset {onnx_graph.OPSET}",
        "input": "images: uint8 N×32×32×3 (NHWC, raw pixels)",
        "outputs": outputs,
    }
    tic = time.perf_counter()
    if images is not None and images[1] is not None:
        card["measured_on"] = {"archive": str(options.calibration), "test_images": len(images[1])}
    card["float32"], reference = _write_float32(staging, model, variables, images, outputs)
    learned = None
    if bits is not None:
        card["quantized"], learned = _write_quantized(
            staging, model, variables, bits, method, images, reference, outputs, options
        )
    if "tflite" in options.formats:
        card["tflite"] = _write_tflite(
            staging, model, variables, bits, images, reference, options, learned
        )
    card["files"] = {
        p.relative_to(staging).as_posix(): p.stat().st_size
        for p in sorted(staging.rglob("*"))
        if p.suffix in (".onnx", ".tflite")
    }
    card["seconds"] = round(time.perf_counter() - tic, 1)
    return card


def _write_float32(staging, model, variables, images, outputs) -> tuple[dict[str, Any], Any]:
    """model.onnx (BN folded) and its exit pair; with images, the runtime's agreement with
    JAX. Returns the card's float32 entry and JAX's logits on the test images (or None)."""
    from micronet_jax.evaluation.early_exit import logit_agreement
    from micronet_jax.models.fold import fold_batch_norm
    from micronet_jax.train.steps import predict

    folded = fold_batch_norm(variables)
    write_graphs(staging, model, folded, None, "", outputs)
    entry: dict[str, Any] = {}
    reference, ratio = None, None
    if images is not None and images[1] is not None:
        test = images[1]
        reference = tuple(r for r in predict(model.apply, variables, test, 500) if r is not None)
        runtime = run_onnx(session(staging / "model.onnx"), test)
        entry["onnx_vs_jax"] = logit_agreement(runtime, reference)
        ratio = logit_agreement(reference, reference).get("exit_ratio")
    entry["score"] = _score(model, folded["params"], ratio, None)
    return entry, reference


def integer_eligible(bits: Any) -> bool:
    """Whether the quantised network can be the integer graph (8-bit kernels and inputs:
    onnxruntime's integer kernels read and write uint8 / int8 codes)."""
    return (bits.weights, bits.activations) == (8, 8) and not bits.overrides


def _write_quantized(
    staging, model, variables, bits, method, images, reference, outputs, options
) -> tuple[dict[str, Any], Any]:
    """model_int8.onnx and its exit pair, post-training quantised on the calibration
    images: at 8x8 the integer graph (`onnx_int8`, every depthwise input on one grid), then
    learned against the float32 network (`integer_learn`), at other widths the QDQ graph of
    the fake quantisation itself; the card's entry (widths, method, score, agreement with
    float32, the runtime's parity with its JAX side) and, at 8x8, the learned values
    (`integer_net.learned_values`) for the LiteRT model."""
    from tqdm.auto import tqdm

    from micronet_jax.evaluation.early_exit import logit_agreement
    from micronet_jax.quant.fake import QuantizedApply
    from micronet_jax.quant.ptq import post_training_quantize
    from micronet_jax.train.steps import predict

    calibration, test, learn_images = images
    integer = integer_eligible(bits)
    if integer:  # onnxruntime has no integer kernel for per-channel input grids
        bits = dataclasses.replace(bits, depthwise_channels=False)
    quantized, _ = post_training_quantize(
        model,
        variables,
        calibration,
        bits,
        method,
        progress=lambda total: tqdm(total=total, desc="quantise", leave=False),
    )
    learning = None
    if not integer and options.learn_steps > 0:
        before = quantized
        quantized, learning = learn_fake_quantisation(
            model, variables, bits, quantized, learn_images, options
        )
        if test is not None:
            learning["post_training_agreement_with_float32"] = logit_agreement(
                tuple(
                    r
                    for r in predict(QuantizedApply(model, bits), before, test, 500)
                    if r is not None
                ),
                reference,
            )
    fake, fake_versus_float = None, {}
    if test is not None:
        fake = tuple(
            r for r in predict(QuantizedApply(model, bits), quantized, test, 500) if r is not None
        )
        fake_versus_float = logit_agreement(fake, reference)
    entry: dict[str, Any] = {
        "bits": options.bits,
        "widths": bits.describe(),
        "method": method.name,
        "calibration": calibration_entry(options, len(calibration)),
        "score": _score(model, quantized["params"], fake_versus_float.get("exit_ratio"), bits),
    }
    if integer:
        from micronet_jax.deploy import onnx_sim

        entry["graph"] = INTEGER_GRAPH
        graphs = write_integer_graphs(staging, model, quantized, calibration, outputs)
        post_training = graphs["model"]
        learned = None
        if options.learn_steps > 0:
            graphs, learned, entry["learning"] = learn_integer_graphs(
                staging, model, variables, graphs, learn_images, options
            )
        if test is None:
            return entry, learned
        runtime = run_onnx(session(staging / "model_int8.onnx"), test)
        simulated = _in_batches(onnx_sim.load(graphs["model"]), test)
        entry["agreement_with_float32"] = logit_agreement(runtime, reference)
        if learned is not None:
            before = _in_batches(onnx_sim.load(post_training), test)
            entry["learning"]["post_training_agreement_with_float32"] = logit_agreement(
                before, reference
            )
            entry["learning"]["agreement_with_float32"] = logit_agreement(simulated, reference)
        entry["fake_quantisation_agreement_with_float32"] = fake_versus_float
        entry["onnx_vs_jax_simulation"] = logit_agreement(runtime, simulated)
        return entry, learned
    write_graphs(staging, model, quantized, bits, "_int8", outputs)
    entry["graph"] = "QDQ on every layer input: the fake quantisation the score counts"
    if learning is not None:
        entry["learning"] = learning
    if test is None:
        return entry, None
    runtime = run_onnx(session(staging / "model_int8.onnx"), test)
    entry["agreement_with_float32"] = fake_versus_float
    entry["onnx_vs_jax_fake_quantisation"] = logit_agreement(runtime, fake)
    if options.num_control > 0:
        entry["jax_xla_conv_vs_jax_fake_quantisation"] = _lowering_control(
            model, bits, quantized, test[: options.num_control], fake
        )
    return entry, None


INTEGER_CALIBRATION_BATCH = 64
INTEGER_GRAPH = (
    "integer: every conv, dense, sigmoid, product, sum and mean on 8-bit codes "
    "(onnxruntime's QLinear kernels); layer inputs and kernels on the project's grids, "
    "the other tensors on grids calibrated on the same images"
)


def calibration_entry(options: ExportOptions, count: int) -> dict[str, Any]:
    """Where the calibration images came from, for the card."""
    if options.calibration == SYNTHETIC:
        return {
            "synthetic": "made from the network's BN statistics (quant.synthetic), seed 0",
            "images": count,
        }
    return {"archive": str(options.calibration), "split": "train", "images": count}


def write_integer_graphs(folder: Path, model, quantized, calibration, outputs) -> dict[str, Any]:
    """model_int8.onnx and the exit pair's head_int8 / tail_int8 as integer graphs (see
    `onnx_int8`), each calibrated on what it reads: the calibration images, or for the tail
    the features the float head gives for them. Returns the graphs by name."""
    import jax
    import onnx

    from micronet_jax.deploy import onnx_graph
    from micronet_jax.deploy.onnx_clean import clean
    from micronet_jax.deploy.onnx_int8 import integer_graph

    variables = {"params": quantized["params"], "batch_stats": quantized["batch_stats"]}
    size = INTEGER_CALIBRATION_BATCH
    batches = [calibration[i : i + size] for i in range(0, len(calibration), size)]

    def build(forward, shape, dtype, names, inputs, input_name=onnx_graph.INPUT_NAME):
        float_graph = clean(onnx_graph.to_onnx(forward, shape, dtype, names, input_name))
        return integer_graph(
            float_graph,
            quantized["params"],
            quantized["weight_scales"],
            quantized["quant"],
            inputs,
        )

    images = ("N", 32, 32, 3)
    graphs = {
        "model": build(onnx_graph.forward_fn(model, variables), images, np.uint8, outputs, batches)
    }
    onnx.save(graphs["model"], folder / "model_int8.onnx")
    if model.arch.exit_head is None:
        return graphs
    (folder / "early_exit").mkdir(exist_ok=True)
    head = onnx_graph.forward_fn(model, variables, part="head")
    graphs["head"] = build(head, images, np.uint8, ["exit_logits", "features"], batches)
    run_head = jax.jit(head)
    features = [np.asarray(run_head(b)[1]) for b in batches]
    tail = onnx_graph.forward_fn(model, variables, part="tail")
    graphs["tail"] = build(
        tail, ("N", *features[0].shape[1:]), np.float32, ["logits"], features, "features"
    )
    onnx.save(graphs["head"], folder / "early_exit" / "head_int8.onnx")
    onnx.save(graphs["tail"], folder / "early_exit" / "tail_int8.onnx")
    return graphs


def _write_tflite(
    staging, model, variables, bits, images, reference, options, learned=None
) -> dict[str, Any]:
    """model.tflite (float32; model_sparse.tflite the same with its pruned kernels in
    LiteRT's sparse encoding) and, with `bits` (8x8), model_int8.tflite (full-integer: the
    converter's graph holding the integer network's codes and grids, `tflite_grids`; or,
    with nothing learned, every tensor's range measured on the calibration images, see
    `tflite.to_tflite`), each with its early-exit pair; the card's entry: calibration,
    agreement with JAX float32, LiteRT's parity with the JAX simulation of each model and,
    learned, whether every value read back from the files equals the JAX network's."""
    from micronet_jax.deploy import onnx_graph, tflite
    from micronet_jax.evaluation.early_exit import logit_agreement
    from micronet_jax.models.fold import fold_batch_norm

    folded = fold_batch_norm(variables)
    calibration = images[0] if bits is not None else None
    entry: dict[str, Any] = {
        "input": "images: uint8 N×32×32×3 (NHWC, raw pixels), any N",
        "early_exit_features": "NHWC",
    }
    for precision, suffix, data in (("float32", "", None), ("int8", "_int8", calibration)):
        if precision == "int8" and data is None:
            continue
        write_tflite_models(staging, model, folded, suffix, data)
        if precision == "int8" and learned is not None:
            part_values = hold_learned_values(staging, learned)
        if precision == "float32":  # the pruned kernels in LiteRT's sparse encoding
            forward = onnx_graph.forward_fn(model, folded, target="tflite")
            sparse = tflite.to_tflite(forward, (1, 32, 32, 3), np.uint8, sparse=True)
            (staging / "model_sparse.tflite").write_bytes(sparse)
        part: dict[str, Any] = {}
        if precision == "int8" and learned is not None:
            part["calibration"] = {
                "by": "the converter's graph holding the learned integer network's kernel "
                "codes, scales, bias codes and every tensor's grid (those of model_int8.onnx)",
            } | calibration_entry(options, len(data))
            part["values_equal_to_jax"] = part_values
        elif precision == "int8":
            part["calibration"] = {
                "by": "every tensor's range measured by the converter on the calibration "
                "images, then clipped to its grid's least expected squared error on them; "
                "kernels rounded by the converter (the project's grids are not taken)",
            } | calibration_entry(options, len(data))
        if images is not None and images[1] is not None:
            from micronet_jax.deploy import tflite_sim

            path = staging / f"model{suffix}.tflite"
            got = _in_batches(tflite.Runner(path), images[1])
            simulated = _in_batches(tflite_sim.load(path), images[1])
            part["agreement_with_jax_float32"] = logit_agreement(got, reference)
            part["litert_vs_jax_simulation"] = logit_agreement(got, simulated)
        entry[precision] = part
    return entry


def learn_integer_graphs(folder: Path, model, variables, graphs: dict, images, options):
    """The integer graphs learned against the float32 network (`integer_learn`) on
    `images`, saved over the post-training ones: (graphs, the learned values by structural
    key for the LiteRT models, the card's entry)."""
    import onnx
    from tqdm.auto import tqdm

    from micronet_jax.deploy import integer_learn
    from micronet_jax.deploy.integer_net import (
        IntegerNetwork,
        float_params,
        layer_names,
        learned_values,
        reference_kernels,
        transfer,
    )
    from micronet_jax.models.fold import fold_batch_norm

    learn = dataclasses.replace(integer_learn.LearnOptions(), steps=options.learn_steps)
    tic = time.perf_counter()
    net = IntegerNetwork(graphs["model"])
    folded = fold_batch_norm(variables)["params"]
    params, losses = integer_learn.learn(
        net,
        integer_learn.teacher_fn(model, variables),
        images,
        learn,
        progress=lambda total: tqdm(total=total, desc="learn the integer network", leave=False),
        float_params=float_params(net, net.init_params(), folded),
    )
    reference = reference_kernels(folded)
    learned = {"model": net.to_onnx(params)}
    for part, name in (("head", "head_int8.onnx"), ("tail", "tail_int8.onnx")):
        if part in graphs:
            learned[part] = transfer(net, params, IntegerNetwork(graphs[part]), reference)
            onnx.save(learned[part], folder / "early_exit" / name)
    onnx.save(learned["model"], folder / "model_int8.onnx")
    values = learned_values(net, params, layer_names(net, reference))
    check = IntegerNetwork(onnx.load(folder / "model_int8.onnx"))
    entry = {
        "by": "every kernel code, kernel scale, bias code, grid step and zero point learned "
        "(straight-through rounding) to give the float32 network's predictions on both heads "
        "(KL divergence) and every gridded tensor's float32 value (normalised squared error, "
        "weighted) on unlabelled training images",
        **learning_entry(learn, images, losses),
        "feature_weight": learn.feature_weight,
        "values_equal_to_jax": same_values(
            values, learned_values(check, check.init_params(), layer_names(check, reference))
        ),
        "seconds": round(time.perf_counter() - tic, 1),
    }
    return learned, (values, reference), entry


def learn_fake_quantisation(model, variables, bits, quantized, images, options):
    """The fake quantisation at widths the integer graph does not take (`quant.learn`):
    (the learned variables, the card's entry)."""
    from tqdm.auto import tqdm

    from micronet_jax.quant.learn import FakeQuantLearning, learn_fake_quant, teacher_fn

    learn = dataclasses.replace(FakeQuantLearning(), steps=options.learn_steps)
    tic = time.perf_counter()
    learned, losses = learn_fake_quant(
        model,
        bits,
        quantized,
        teacher_fn(model, variables),
        images,
        learn,
        progress=lambda total: tqdm(total=total, desc="learn the quantised network", leave=False),
    )
    entry = {
        "by": "every kernel, bias, kernel scale and activation range learned (straight-through "
        "rounding) to give the float32 network's predictions on both heads (KL divergence) on "
        "unlabelled training images; kept only if nearer float32 (KL) than the post-training "
        "network on the tenth of them held out of learning",
        **learning_entry(learn, images, losses),
        "held_out_kl_before_and_after": losses.held_out,
        "kept": losses.kept,
        "seconds": round(time.perf_counter() - tic, 1),
    }
    return learned, entry


def learning_entry(learn: Any, images: np.ndarray, losses: list[float]) -> dict[str, Any]:
    """What every learning entry of the card says: images, steps, batch, augmentation, the
    loss at the start and the end."""
    return {
        "images": len(images),
        "steps": learn.steps,
        "batch_size": learn.batch_size,
        "augment": learn.augment,
        "loss_first_and_last_10_steps": [
            round(float(np.mean(losses[:10])), 5),
            round(float(np.mean(losses[-10:])), 5),
        ],
    }


def same_values(ours: tuple, theirs: tuple) -> dict[str, Any]:
    """Whether a file holds exactly the learned network's grids, codes and scales (each
    grid and layer of the file compared with the JAX side's)."""
    grids, layers = ours[0], ours[1]
    file_grids, file_layers = theirs[0], theirs[1]
    grid_equal = sum(
        1
        for key, value in file_grids.items()
        if key in grids and tuple(map(float, value)) == tuple(map(float, grids[key]))
    )
    layer_equal = 0
    for name, (codes, scales, bias) in file_layers.items():
        mine = layers.get(name)
        if mine is None:
            continue
        same = np.array_equal(codes, mine[0]) and np.allclose(scales, mine[1], rtol=1e-6, atol=0)
        if bias is not None:
            same = same and np.array_equal(bias[0], mine[2][0])
            same = same and np.allclose(bias[1], mine[2][1], rtol=1e-6, atol=0)
        layer_equal += bool(same)
    return {
        "grids": len(file_grids),
        "grids_equal": grid_equal,
        "layers": len(file_layers),
        "layers_equal": layer_equal,
    }


def hold_learned_values(folder: Path, learned) -> dict[str, Any]:
    """The LiteRT int8 models rewritten to hold the learned network's values; what each
    file reads back, compared with them."""
    from micronet_jax.deploy import tflite_grids

    values, reference = learned
    checks = {}
    paths = [folder / "model_int8.tflite"]
    paths += sorted((folder / "early_exit").glob("*_int8.tflite"))
    for path in paths:
        data = tflite_grids.write_network(path.read_bytes(), values, reference)
        path.write_bytes(data)
        checks[path.relative_to(folder).as_posix()] = same_values(
            values, tflite_grids.read_back(data, reference, values[3])
        )
    return checks


def _in_batches(run, images: np.ndarray, batch: int = 500) -> tuple[np.ndarray, ...]:
    parts = [run(images[i : i + batch]) for i in range(0, len(images), batch)]
    return tuple(np.concatenate([np.asarray(p) for p in outs]) for outs in zip(*parts, strict=True))


TFLITE_CALIBRATION_BATCH = 32


def write_tflite_models(folder: Path, model, folded, suffix: str, calibration) -> None:
    """model{suffix}.tflite and, with an exit head, early_exit/head{suffix}.tflite (images ->
    exit logits, features in NHWC) and early_exit/tail{suffix}.tflite (features -> logits);
    int8 when `calibration` images are given (the tail calibrated on their features)."""
    import jax

    from micronet_jax.deploy import onnx_graph
    from micronet_jax.deploy.tflite import to_tflite

    batch = TFLITE_CALIBRATION_BATCH if calibration is not None else 1
    images = (batch, 32, 32, 3)
    full = onnx_graph.forward_fn(model, folded, target="tflite")
    (folder / f"model{suffix}.tflite").write_bytes(to_tflite(full, images, np.uint8, calibration))
    if model.arch.exit_head is None:
        return
    (folder / "early_exit").mkdir(exist_ok=True)
    head = onnx_graph.forward_fn(model, folded, part="head", target="tflite")
    data = to_tflite(head, images, np.uint8, calibration)
    (folder / "early_exit" / f"head{suffix}.tflite").write_bytes(data)
    features = jax.eval_shape(head, jax.ShapeDtypeStruct(images, np.uint8))[1]
    features_data = None
    if calibration is not None:
        run_head = jax.jit(head)
        starts = range(0, len(calibration) - batch + 1, batch)
        features_data = np.concatenate(
            [np.asarray(run_head(calibration[i : i + batch])[1]) for i in starts]
        )
    tail = onnx_graph.forward_fn(model, folded, part="tail", target="tflite")
    data = to_tflite(tail, features.shape, np.float32, features_data)
    (folder / "early_exit" / f"tail{suffix}.tflite").write_bytes(data)


def _lowering_control(model, bits, quantized, images, fake) -> dict[str, Any]:
    """The same fake-quantised network in JAX with XLA's convolutions (the graph's) instead
    of the CPU's shifted sums: how far two lowerings of one network move predictions, the
    yardstick for the runtime's parity (the grids turn float rounding differences into
    whole steps wherever a value lies near a grid boundary)."""
    from micronet_jax.deploy import onnx_graph
    from micronet_jax.evaluation.early_exit import logit_agreement
    from micronet_jax.quant.fake import QuantizedApply
    from micronet_jax.train.steps import predict

    apply = QuantizedApply(onnx_graph.export_model(model), bits)
    other = tuple(r for r in predict(apply, quantized, images, 500) if r is not None)
    return logit_agreement(other, tuple(f[: len(images)] for f in fake)) | {"images": len(images)}


def _score(model, params, ratio, bits) -> dict[str, Any]:
    """The honest MicroNet score: each tensor's real mask, BN as a bias, the exit ratio
    measured on the test images (none measured: no image exits)."""
    from micronet_jax.scoring.counter import count_micronet

    count = count_micronet(model.arch, params=params, exit_ratio=ratio, bn_as_bias=True, bits=bits)
    measured = "measured on the test images" if ratio is not None else "0 (no test images)"
    return {
        "total": count.score,
        "param": count.param_score,
        "math": count.math_score,
        "exit_ratio": ratio,
        "widths": count.widths,
        "counted": f"real masks, BN as a bias, exit ratio {measured}",
    }


def write_graphs(folder: Path, model, variables, bits, suffix: str, outputs: list[str]) -> None:
    """model{suffix}.onnx and, with an exit head, the early-exit pair early_exit/head{suffix}
    (images -> exit logits, the exit block's features in NCHW) and early_exit/tail{suffix}
    (features -> logits), for runtimes where the caller decides the exit. Every graph is
    cleaned for deployment (`onnx_clean.clean`: about one node per network operation)."""
    import jax
    import onnx

    from micronet_jax.deploy import onnx_graph
    from micronet_jax.deploy.onnx_clean import clean

    def save(proto, path: Path) -> None:
        onnx.save(clean(proto), path)

    images = ("N", 32, 32, 3)
    full = onnx_graph.forward_fn(model, variables, bits)
    save(onnx_graph.to_onnx(full, images, np.uint8, outputs), folder / f"model{suffix}.onnx")
    if model.arch.exit_head is None:
        return
    (folder / "early_exit").mkdir(exist_ok=True)
    head = onnx_graph.forward_fn(model, variables, bits, part="head")
    proto = onnx_graph.to_onnx(head, images, np.uint8, ["exit_logits", "features"])
    save(proto, folder / "early_exit" / f"head{suffix}.onnx")
    probe = jax.ShapeDtypeStruct((1, 32, 32, 3), np.uint8)
    features = jax.eval_shape(head, probe)[1]  # NCHW: the ONNX pair's layout
    tail = onnx_graph.forward_fn(model, variables, bits, part="tail")
    proto = onnx_graph.to_onnx(
        tail, ("N", *features.shape[1:]), np.float32, ["logits"], input_name="features"
    )
    save(proto, folder / "early_exit" / f"tail{suffix}.onnx")
