"""Figures of a run: per-layer cost, accuracy vs sparsity, exit trade-off, training curves.

Every figure is a PNG with the CSV (or JSON) of the numbers drawn beside it, so a plot can
be checked or redrawn without rerunning anything. Matplotlib runs headless (Agg).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from micronet_jax.scoring.counter import MicroNetCount


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """A CSV of dict rows (columns: the first row's keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        columns = list(rows[0]) if rows else []
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_rows(path: Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


# --- per-layer parameters and math operations ----------------------------------------------


def layer_rows(dense: MicroNetCount, pruned: MicroNetCount) -> list[dict[str, Any]]:
    """Per layer: dense vs pruned params (values + mask bits, 32-bit units) and math ops.

    Params are storage in 32-bit units at the count's bit widths, so masks are included:
    what the score charges, not just the kept weights.
    """
    rows = []
    for d, p in zip(dense.layers, pruned.layers, strict=True):
        rows.append(
            {
                "layer": d.name,
                "dense_params": _storage(d, dense),
                "pruned_params": _storage(p, pruned),
                "dense_math_ops": d.math_ops,
                "pruned_math_ops": p.math_ops,
            }
        )
    return rows


def _storage(layer: Any, count: MicroNetCount) -> float:
    del count
    return layer.storage


def plot_layer_costs(rows: Sequence[dict[str, Any]], out_dir: Path, title: str) -> list[Path]:
    """Two stacked-bar figures (as the original's Params / MathOps figures): the bottom bar is
    what the pruned network keeps, the top what pruning removed from the dense one."""
    write_rows(out_dir / "layer_costs.csv", rows)
    paths = [out_dir / "layer_costs.csv"]
    plt = pyplot()
    names = [r["layer"] for r in rows]
    x = np.arange(len(rows))
    for key, label, file in (
        ("params", "parameter storage (32-bit units)", "layer_params.png"),
        ("math_ops", "math operations per image", "layer_math_ops.png"),
    ):
        kept = np.array([float(r[f"pruned_{key}"]) for r in rows])
        dense = np.array([float(r[f"dense_{key}"]) for r in rows])
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rows) + 2), 4.5))
        ax.bar(x, kept, color="tab:blue", label="pruned network (kept)")
        ax.bar(
            x,
            np.maximum(dense - kept, 0),
            bottom=kept,
            color="tab:gray",
            alpha=0.5,
            label="removed by pruning (dense − kept)",
        )
        ax.set_xticks(x, names, rotation=60, ha="right")
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.set_title(f"{title}: {label}")
        ax.legend()
        paths.append(_save(fig, out_dir / file))
    return paths


# --- accuracy vs sparsity ------------------------------------------------------------------


def sparsity_rows(summaries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per finished stage (its done.json): sparsity and final test accuracy."""
    rows = []
    for s in summaries:
        final = s.get("final") or {}
        rows.append(
            {
                "stage": s["stage"],
                "target": s.get("target"),
                "sparsity": s["sparsity"],
                "exit_sparsity": s.get("exit_sparsity"),
                "test_accuracy": final.get("test_accuracy"),
            }
        )
    return rows


def plot_accuracy_vs_sparsity(rows: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Main-network accuracy after each pruning round (exit stages report combined accuracy,
    so they are drawn apart)."""
    csv_path = write_rows(out_dir / "accuracy_vs_sparsity.csv", rows)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    main = [r for r in rows if not str(r["stage"]).startswith("exit")]
    exits = [r for r in rows if str(r["stage"]).startswith("exit")]
    for group, style, label in (
        (main, "o-", "main network (baseline, pruning rounds)"),
        (exits, "s", "with exit head (combined)"),
    ):
        pts = [
            (100 * float(r["sparsity"]), 100 * float(r["test_accuracy"]))
            for r in group
            if r["test_accuracy"] not in (None, "")
        ]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=label)
            for r, (sx, acc) in zip(group, pts, strict=False):
                ax.annotate(
                    str(r["stage"]),
                    (sx, acc),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    ax.set_xlabel("main-network sparsity (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs sparsity across pruning rounds")
    ax.legend()
    return [csv_path, _save(fig, out_dir / "accuracy_vs_sparsity.png")]


# --- exit trade-off ------------------------------------------------------------------------


def plot_exit_tradeoff(
    rows: Sequence[dict[str, Any]],
    out_dir: Path,
    title: str,
    name: str = "exit_tradeoff",
    metric: str = "accuracy",
    metric_label: str = "accuracy (%)",
) -> list[Path]:
    """Accuracy vs math score, one curve per exit position, thresholds annotated; the
    Pareto front (no other point both more accurate and cheaper) drawn over them."""
    csv_path = write_rows(out_dir / f"{name}.csv", rows)
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    positions = sorted({int(r["exit_block"]) for r in rows})
    for pos in positions:
        pts = sorted(
            (float(r["math_score"]), 100 * float(r[metric]), float(r["threshold"]))
            for r in rows
            if int(r["exit_block"]) == pos
        )
        ax.plot(
            [p[0] for p in pts], [p[1] for p in pts], "o-", ms=4, label=f"exit after block {pos}"
        )
        for ms, acc, th in (pts[0], pts[-1]):
            ax.annotate(
                f"{th:.2f}", (ms, acc), fontsize=6, xytext=(2, 2), textcoords="offset points"
            )
    front = pareto_front(rows, metric)
    ax.plot(
        [float(r["math_score"]) for r in front],
        [100 * float(r[metric]) for r in front],
        "k--",
        marker="o",
        mfc="none",
        ms=10,
        lw=1,
        label="Pareto front",
    )
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.set_xlabel("math score (lower is cheaper)")
    ax.set_ylabel(metric_label)
    ax.set_title(title)
    ax.legend(fontsize=7)
    return [csv_path, _save(fig, out_dir / f"{name}.png")]


def pareto_front(rows: Sequence[dict[str, Any]], metric: str = "accuracy") -> list[dict[str, Any]]:
    """Rows not dominated in (lower math score, higher `metric`), cheapest first."""
    ordered = sorted(rows, key=lambda r: (float(r["math_score"]), -float(r[metric])))
    front, best = [], -1.0
    for r in ordered:
        if float(r[metric]) > best:
            front.append(r)
            best = float(r[metric])
    return front


# --- training curves -----------------------------------------------------------------------


def curve_rows(stages: Sequence[tuple[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Every epoch record of every stage on one running epoch axis."""
    rows, offset = [], 0
    for name, records in stages:
        for rec in records:
            rows.append(
                {
                    "stage": name,
                    "epoch": offset + int(rec["epoch"]),
                    "stage_epoch": int(rec["epoch"]),
                    "lr": rec.get("lr"),
                    "train_loss": rec.get("train_loss"),
                    "train_accuracy": rec.get("train_accuracy"),
                    "test_loss": rec.get("test_loss"),
                    "test_accuracy": rec.get("test_accuracy"),
                }
            )
        offset += max((int(r["epoch"]) for r in records), default=0)
    return rows


def plot_training_curves(rows: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Loss and accuracy over all stages, stage boundaries marked."""
    csv_path = write_rows(out_dir / "training_curves.csv", rows)
    plt = pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, keys, ylabel in (
        (ax_loss, ("train_loss", "test_loss"), "loss"),
        (ax_acc, ("train_accuracy", "test_accuracy"), "accuracy"),
    ):
        for key in keys:
            pts = [(r["epoch"], r[key]) for r in rows if r.get(key) not in (None, "")]
            if pts:
                ax.plot(*zip(*pts, strict=True), ".-", label=key.replace("_", " "))
        for r in rows:
            if r["stage_epoch"] == 1:
                if r["epoch"] > 1:
                    ax.axvline(r["epoch"] - 0.5, color="gray", lw=0.5, ls=":")
                ax.annotate(
                    r["stage"],
                    (r["epoch"] - (0.45 if r["epoch"] > 1 else 0.0), 0.99),
                    xycoords=("data", "axes fraction"),
                    fontsize=6,
                    rotation=90,
                    va="top",
                    color="gray",
                )
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("epoch (all stages, in order)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"Training curves: {ylabel}")
        ax.legend()
    fig.suptitle(
        "exit stages train the exit head (its own loss) and report combined accuracy", fontsize=8
    )
    return [csv_path, _save(fig, out_dir / "training_curves.png")]
