"""The final report of a run or a checkpoint: accuracies, exit ratio, sparsity, MicroNet score.

The score is given twice: as the original counted it (its global sparsity applied uniformly
to every tensor) and honestly (each tensor's real mask), both at the measured exit ratio.
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


# --- plots of a finished run: `python -m micronet_jax.report --workdir=DIR` ----------------

SWEEP_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.50 … 0.95


def _stage_key(name: str) -> tuple[int, str]:
    """stage_a, prune_01 … prune_NN, exit, exit_prune_01 …: the order the recipe runs them."""
    if name == "stage_a":
        return 0, name
    if name.startswith("prune_"):
        return 1, name
    if name == "exit":
        return 2, name
    return 3, name


def stage_dirs(workdir: Path) -> list[Path]:
    """Stage folders of a run (those with metrics or a done.json), in recipe order."""
    found = {
        p.parent
        for pattern in ("*/done.json", "*/metrics.jsonl")
        for p in Path(workdir).glob(pattern)
        if not p.parent.name.startswith(".")
    }
    return sorted(found, key=lambda p: _stage_key(p.name))


def load_run_config(workdir: Path) -> Any:
    """The ConfigDict a run recorded in config.json (None when there is none)."""
    from ml_collections import ConfigDict

    path = Path(workdir) / "config.json"
    return ConfigDict(json.loads(path.read_text())) if path.exists() else None


def load_final_variables(workdir: Path, config: Any) -> tuple[MicroNet, dict]:
    """The exit model and the final variables of the run's last finished stage with a head."""
    from micronet_jax import builders
    from micronet_jax.errors import CheckpointError
    from micronet_jax.pipeline import Context, load_final, plan_stages

    finished = [s for s in plan_stages(config) if (workdir / s.name / "done.json").exists()]
    finished = [s for s in finished if s.kind in ("exit", "exit_prune")]
    if not finished:
        raise CheckpointError(f"{workdir} holds no finished exit stage")
    exit_model = builders.model_from_config(config, builders.architecture_from_config(config, True))
    ctx = Context(config, None, None, None, builders.model_from_config(config), exit_model)
    variables, _ = load_final(ctx, finished[-1], workdir / finished[-1].name)
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
    from micronet_jax.inference import select_predictions
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
    from micronet_jax import builders
    from micronet_jax.scoring import LayerCount, MicroNetCount

    arch = builders.architecture_from_config(config, with_exit=True)
    if report is not None:
        ratio = report["metrics"]["exit_ratio"]
        fields = ("name", "params", "mults", "adds", "mask_bits", "share")
        layers = [{k: layer[k] for k in fields} for layer in report["score_actual_masks"]["layers"]]
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
    """(stage, epoch records) of each stage; a stage-A-only run keeps its metrics at the top."""
    from micronet_jax import plots

    found = [(d, d.name) for d in dirs] + [(workdir, "train")]
    return [
        (name, plots.read_jsonl(d / "metrics.jsonl"))
        for d, name in found
        if (d / "metrics.jsonl").exists()
    ]


def _exit_rows(workdir: Path, config: Any, final: Any) -> tuple[list[dict[str, Any]], str]:
    """The exit sweep's rows when one was saved in the run, else a threshold sweep."""
    from micronet_jax import builders, plots

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

    from micronet_jax import plots
    from micronet_jax.errors import CheckpointError

    workdir = Path(workdir)
    out = Path(out) if out else workdir / "plots"
    config = load_run_config(workdir)
    dirs = stage_dirs(workdir)
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


def main(argv: list[str] | None = None) -> int:
    """Regenerate every plot of a finished (or partly finished) run."""
    import argparse

    from micronet_jax.errors import MicronetError

    parser = argparse.ArgumentParser(
        prog="python -m micronet_jax.report",
        description="Plots of a run: per-layer cost, accuracy vs sparsity, exit trade-off, "
        "training curves (PNG + CSV each).",
    )
    parser.add_argument("--workdir", required=True, help="a pipeline (or training) workdir")
    parser.add_argument("--out", default=None, help="default: WORKDIR/plots")
    args = parser.parse_args(argv)
    if not Path(args.workdir).is_dir():
        parser.error(f"--workdir {args.workdir} is not a directory")
    try:
        paths = write_plots(Path(args.workdir), args.out and Path(args.out))
    except MicronetError as error:
        print(f"error: {error}")
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
