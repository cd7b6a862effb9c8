"""A model's scorecard: accuracies, exit ratio, sparsity and MicroNet score, as
`report.json` and `report.md`.

The score is given twice: as the original counted it (its global sparsity applied uniformly
to every tensor) and honestly (each tensor's real mask), both at the measured exit ratio.
The pipeline writes one at the end of a run and `configs/test.py` for a checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from micronet_jax import pruning
from micronet_jax.inference import exit_metrics, exit_predict_exact
from micronet_jax.models.efficientnet import MicroNet
from micronet_jax.score import format_table
from micronet_jax.scoring import count_micronet, measured_sparsity


def build_report(
    model: MicroNet,
    variables: dict,
    images: np.ndarray,
    labels: np.ndarray,
    threshold: float,
    batch_size: int = 500,
    stages: list[dict] | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """Evaluate `model` (with its exit head) on a test set and count its MicroNet score."""
    result = exit_predict_exact(model, variables, images, threshold, batch_size)
    metrics = exit_metrics(result, labels)
    params = variables["params"]
    arch = model.arch
    main_sparsity, exit_sparsity = measured_sparsity(arch, params)
    ratio = metrics["exit_ratio"]
    published = count_micronet(
        arch, sparsity=main_sparsity, exit_ratio=ratio, exit_sparsity=exit_sparsity
    )
    honest = count_micronet(arch, params=params, exit_ratio=ratio)
    return {
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
    for label, key in (
        ("as published (uniform sparsity)", "score_published_convention"),
        ("actual masks", "score_actual_masks"),
    ):
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
