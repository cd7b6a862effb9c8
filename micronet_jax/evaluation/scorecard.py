"""A model's scorecard: accuracies, exit ratio, sparsity and MicroNet score, as
`report.json` and `report.md`.

The score is given twice: as the original counted it (its global sparsity applied uniformly
to every tensor) and honestly (each tensor's real mask), both at the measured exit ratio and
with the 16-bit freebie. A quantised network is evaluated quantised and gets a third score at
its real bit widths (real masks, BN counted as a bias: what a quantised entry must count).
With a `reference` (the float32 network's predictions) the report adds the agreement of each
path with it, the measure when the test images are outside the network's classes.
The pipeline writes one at the end of a run and `configs/test.py` for a checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from micronet_jax.evaluation.early_exit import (
    ExitResult,
    agreement,
    exit_metrics,
    exit_predict_exact,
)
from micronet_jax.models.efficientnet import MicroNet
from micronet_jax.quant.fake import QuantizedApply, quantize_weights
from micronet_jax.quant.widths import BitWidths
from micronet_jax.scoring.counter import count_micronet, measured_sparsity
from micronet_jax.scoring.table import format_table
from micronet_jax.train import pruning


def build_report(
    model: MicroNet,
    variables: dict,
    images: np.ndarray,
    labels: np.ndarray,
    threshold: float,
    batch_size: int = 500,
    stages: list[dict] | None = None,
    source: str | None = None,
    bits: BitWidths | None = None,
    reference: ExitResult | None = None,
) -> dict[str, Any]:
    """Evaluate `model` (with its exit head; quantised at `bits` when they are below 16) on a
    test set and count its MicroNet score."""
    quantised = bits is not None and bits.quantised
    apply_fn = QuantizedApply(model, bits) if quantised else None
    result = exit_predict_exact(model, variables, images, threshold, batch_size, apply_fn)
    metrics = exit_metrics(result, labels)
    if reference is not None:
        metrics.update(agreement_metrics(result, reference))
    params = variables["params"]
    arch = model.arch
    main_sparsity, exit_sparsity = measured_sparsity(arch, params)
    ratio = metrics["exit_ratio"]
    published = count_micronet(
        arch, sparsity=main_sparsity, exit_ratio=ratio, exit_sparsity=exit_sparsity
    )
    honest = count_micronet(arch, params=params, exit_ratio=ratio)
    report = {
        "source": source,
        "threshold": threshold,
        "num_test_images": int(len(labels)),
        "metrics": metrics,
        "sparsity": main_sparsity,
        "exit_sparsity": exit_sparsity,
        "layer_sparsity": pruning.sparsity_by_layer(params),
        "score_published_convention": published.to_dict(),
        "score_actual_masks": honest.to_dict(),
        "tables": {
            "published_convention": format_table(
                published, f"uniform sparsity {main_sparsity:.4%}, exit ratio {ratio:.4f}"
            ),
            "actual_masks": format_table(honest, f"actual masks, exit ratio {ratio:.4f}"),
        },
        "stages": stages or [],
    }
    if quantised:
        weights = quantize_weights(params, bits)
        count = count_micronet(arch, params=weights, exit_ratio=ratio, bn_as_bias=True, bits=bits)
        report["bits"] = bits.describe()
        report["score_quantized"] = count.to_dict()
        title = f"actual masks, {bits.describe()}, BN as bias, exit ratio {ratio:.4f}"
        report["tables"]["quantized"] = format_table(count, title)
    return report


def agreement_metrics(result: ExitResult, reference: ExitResult) -> dict[str, float]:
    """`early_exit.agreement` under the report's names (main_agreement, …)."""
    return {f"{path}_agreement": value for path, value in agreement(result, reference).items()}


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def report_markdown(report: dict[str, Any]) -> str:
    m = report["metrics"]
    lines = ["# MicroNet report", ""]
    if report.get("source"):
        lines += [f"Checkpoint: `{report['source']}`", ""]
    lines += [
        f"Test images: {report['num_test_images']}; exit threshold {report['threshold']}",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in m.items()]
    lines += [
        f"| main-network sparsity | {report['sparsity']:.4%} |",
        f"| exit-head sparsity | {report['exit_sparsity']:.4%} |",
        "",
        "## MicroNet score",
        "",
        "| counting | param score | math score | score |",
        "|---|---|---|---|",
    ]
    rows = [
        ("as published (uniform sparsity, 16-bit freebie)", "score_published_convention"),
        ("actual masks (16-bit freebie)", "score_actual_masks"),
    ]
    if "score_quantized" in report:
        rows.append((f"actual masks, {report['bits']}, BN as bias", "score_quantized"))
    for label, key in rows:
        s = report[key]
        lines.append(
            f"| {label} | {s['param_score']:.6f} | {s['math_score']:.6f} | {s['score']:.6f} |"
        )
    for title, table in report["tables"].items():
        lines += ["", f"### {title.replace('_', ' ')}", "", "```", table, "```"]
    lines += ["", "## Per-layer sparsity", "", "| tensor | sparsity |", "|---|---|"]
    lines += [f"| {k} | {v:.2%} |" for k, v in report["layer_sparsity"].items()]
    if report.get("stages"):
        lines += [
            "",
            "## Stages",
            "",
            "| stage | epochs | target | sparsity | test accuracy |",
            "|---|---|---|---|---|",
        ]
        for s in report["stages"]:
            acc = s.get("final", {}).get("test_accuracy")
            lines.append(
                f"| {s['stage']} | {s['epochs']} | {s.get('target') or ''} | "
                f"{s['sparsity']:.2%} | {'' if acc is None else f'{acc:.4f}'} |"
            )
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(workdir: Path, report: dict[str, Any], echo: bool = True) -> None:
    """Write `report.json` and `report.md` under `workdir`, and print the Markdown."""
    workdir.mkdir(parents=True, exist_ok=True)
    text = report_markdown(report)
    _atomic_write(workdir / "report.json", json.dumps(report, indent=2, sort_keys=True))
    _atomic_write(workdir / "report.md", text)
    if echo:
        print(text)
