"""Plots of a finished (or partly finished) run, the library behind
`python -m micronet_jax.report --workdir=DIR`.

Reads only what a run leaves on disk (metrics.jsonl, done.json, report.json, the final
checkpoints through `stages`), so it can be run while the pipeline is still training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from micronet_jax.config.defaults import default_config
from micronet_jax.config.workdir import CONFIG_FILE
from micronet_jax.evaluation.early_exit import exit_metrics
from micronet_jax.models.efficientnet import MicroNet
from micronet_jax.recipe import stages
from micronet_jax.scoring.counter import count_micronet, measured_sparsity

SWEEP_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.50 … 0.95


def load_run_config(workdir: Path) -> Any:
    """The config a run recorded in config.json (None when there is none), over today's
    defaults: a key added since the run was made reads as its default."""
    path = Path(workdir) / CONFIG_FILE
    if not path.exists():
        return None
    config = default_config()
    _merge(config, json.loads(path.read_text()))
    return config


def _merge(config: Any, recorded: dict) -> None:
    for key, value in recorded.items():
        if isinstance(value, dict) and key in config and hasattr(config[key], "keys"):
            _merge(config[key], value)
        else:
            with config.ignore_type():
                config[key] = tuple(value) if isinstance(value, list) else value


def load_final_variables(workdir: Path, config: Any) -> tuple[MicroNet, dict]:
    """The exit model and the final variables of the run's last finished stage with a head."""
    from micronet_jax.config import builders

    stage = stages.last_exit_stage(config, workdir)
    exit_model = builders.model_from_config(config, builders.architecture_from_config(config, True))
    variables, _ = stages.load_final(config, stage, workdir / stage.name)
    return exit_model, variables


def threshold_sweep(
    model: MicroNet,
    variables: dict,
    images: np.ndarray,
    labels: np.ndarray,
    thresholds: tuple[float, ...] = SWEEP_THRESHOLDS,
    batch_size: int = 500,
) -> list[dict[str, Any]]:
    """Exit ratio, accuracy and score at each threshold; both heads are evaluated once."""
    from micronet_jax.evaluation.early_exit import select_predictions
    from micronet_jax.train.steps import predict

    main_logits, exit_logits = predict(model.apply, variables, images, batch_size)
    arch, params = model.arch, variables["params"]
    main_sparsity, exit_sparsity = measured_sparsity(arch, params)
    rows = []
    for threshold in thresholds:
        m = exit_metrics(select_predictions(main_logits, exit_logits, threshold), labels)
        count = count_micronet(
            arch, sparsity=main_sparsity, exit_sparsity=exit_sparsity, exit_ratio=m["exit_ratio"]
        )
        rows.append(
            {
                "exit_block": arch.exit_head.after_block,
                "threshold": threshold,
                "exit_ratio": m["exit_ratio"],
                "accuracy": m["accuracy"],
                "math_score": count.math_score,
                "score": count.score,
            }
        )
    return rows


def _layer_counts(config: Any, report: dict | None, final: Any) -> tuple:
    """(dense, pruned) counts at the run's exit ratio: pruned from the actual masks."""
    from micronet_jax.config import builders
    from micronet_jax.scoring.counter import LayerCount, MicroNetCount

    arch = builders.architecture_from_config(config, with_exit=True)
    if report is not None:
        ratio = report["metrics"]["exit_ratio"]
        fields = (
            "name",
            "params",
            "mults",
            "adds",
            "mask_bits",
            "share",
            "param_bits",
            "mult_bits",
        )
        layers = [
            {k: layer[k] for k in fields if k in layer}
            for layer in report["score_actual_masks"]["layers"]
        ]
        pruned = MicroNetCount(tuple(LayerCount(**layer) for layer in layers))
    else:
        _, variables = final()
        ratio = 0.0
        pruned = count_micronet(arch, params=variables["params"], exit_ratio=ratio)
    return count_micronet(arch, exit_ratio=ratio), pruned


def find_exit_sweep(workdir: Path) -> Path | None:
    for path in (workdir / "exit_sweep.csv", workdir / "exit_sweep" / "exit_sweep.csv"):
        if path.exists():
            return path
    return None


def _curves(workdir: Path, dirs: list[Path]) -> list[tuple[str, list[dict[str, Any]]]]:
    """(stage, epoch records) of each stage; a stage-A-only run keeps its metrics at the top.
    A run still in progress may end in a half-written line: it is skipped, as on resume."""
    from micronet_jax.train.metrics import read_records

    found = [(d, d.name) for d in dirs] + [(workdir, "train")]
    return [
        (name, read_records(d / "metrics.jsonl"))
        for d, name in found
        if (d / "metrics.jsonl").exists()
    ]


def _exit_rows(workdir: Path, config: Any, final: Any) -> tuple[list[dict[str, Any]], str]:
    """The exit sweep's rows when one was saved in the run, else a threshold sweep."""
    from micronet_jax.config import builders
    from micronet_jax.evaluation import plots

    sweep_csv = find_exit_sweep(workdir)
    if sweep_csv is not None:
        return plots.read_rows(sweep_csv), f"Exit trade-off (from {sweep_csv.name})"
    model, variables = final()
    _, test = builders.load_data(config)
    rows = threshold_sweep(
        model, variables, test.images, test.labels, batch_size=config.train.eval_batch_size
    )
    return rows, f"Exit trade-off: thresholds {SWEEP_THRESHOLDS[0]}–{SWEEP_THRESHOLDS[-1]}"


def write_plots(workdir: Path, out: Path | None = None) -> list[Path]:
    """Every figure of a run (PNG + its CSV) under `out` (default `workdir/plots`).

    Per-layer and exit plots need a finished exit stage (or report.json); before that only
    the training curves and accuracy vs sparsity are drawn.
    """
    import functools

    from micronet_jax.errors import CheckpointError
    from micronet_jax.evaluation import plots

    workdir = Path(workdir)
    out = Path(out) if out else workdir / "plots"
    config = load_run_config(workdir)
    dirs = stages.stage_dirs(workdir)
    paths: list[Path] = []
    curves = _curves(workdir, dirs)
    if curves:
        paths += plots.plot_training_curves(plots.curve_rows(curves), out)
    summaries = [
        json.loads((d / "done.json").read_text()) for d in dirs if (d / "done.json").exists()
    ]
    if summaries:
        paths += plots.plot_accuracy_vs_sparsity(plots.sparsity_rows(summaries), out)
    if config is None:
        return paths
    final = functools.cache(lambda: load_final_variables(workdir, config))
    report_path = workdir / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    try:
        dense, pruned = _layer_counts(config, report, final)
        paths += plots.plot_layer_costs(plots.layer_rows(dense, pruned), out, "Per-layer cost")
        rows, title = _exit_rows(workdir, config, final)
    except CheckpointError as error:  # no exit stage finished yet: nothing more to draw
        print(f"per-layer and exit plots skipped: {error}")
        return paths
    paths += plots.plot_exit_tradeoff(rows, out, title)
    return paths
