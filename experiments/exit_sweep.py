"""Exit head at every block position × exit thresholds: accuracy against MicroNet cost.

For a converted original checkpoint (default: first_submission) or a finished pipeline
workdir: the exit head of the model is used as is at its own position; at every other
position a fresh head is trained briefly with `exit_train_step` (main network frozen).
For each (position, threshold 0.80–0.95) the table gives exit ratio, accuracies, the ops of
the exit path and its share of the full path's, and the MicroNet score counted as
`python -m micronet_jax.score` counts it (global sparsity applied uniformly, 16-bit, BN not
counted, upsample not counted, measured exit ratio) plus the score from the real masks.

    python -m experiments.exit_sweep --out=runs/exit_sweep                      # CPU, minutes
    python -m experiments.exit_sweep --out=runs/exit_sweep --preset=full \
        --data=PATH/cifar-100-python.tar.gz

Small scale measures on a few hundred real CIFAR-10 test images: out of domain for the
CIFAR-100 network (accuracies are near chance; exit ratios and costs are still the rule's),
and trains new heads for a few steps. `--preset=full`: CIFAR-100 test set, heads trained
for 2 epochs of CIFAR-100 training images.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from benchmarks.shared_data import REFERENCE
from experiments import proxy
from micronet_jax import (
    Architecture,
    MicroNet,
    StepConfig,
    count_micronet,
    create_exit_state,
    exit_metrics,
    exit_train_step,
    init_variables,
    make_optimizer,
    measured_sparsity,
    predict,
    select_predictions,
)
from micronet_jax.data.cifar import load_cifar
from micronet_jax.errors import CommandParser
from micronet_jax.train.optim import cosine_per_epoch
from micronet_jax.train.state import full_variables

DEFAULT_CHECKPOINT = REFERENCE / "first_submission" / "trained_model.pth"
THRESHOLDS = (0.80, 0.85, 0.90, 0.95)
PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(dataset="cifar10", num_test=300, num_train=512, steps=10, batch_size=32),
    "full": dict(dataset="cifar100", num_test=0, num_train=0, steps=0, batch_size=128),
}
COLUMNS = (
    "exit_block",
    "head",
    "threshold",
    "exit_ratio",
    "accuracy",
    "exit_head_accuracy",
    "main_accuracy",
    "agreement",
    "exit_path_ops",
    "full_path_ops",
    "exit_path_share",
    "math_ops",
    "param_score",
    "math_score",
    "score",
    "score_actual_masks",
    "sparsity",
    "exit_sparsity",
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = CommandParser(
        prog="python -m experiments.exit_sweep", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default=None, help="an original .pth")
    source.add_argument("--workdir", default=None, help="a finished pipeline workdir")
    parser.add_argument("--data", default=None, help="archive or folder (default: ../shared)")
    parser.add_argument("--dataset", choices=("cifar10", "cifar100"), default=None)
    parser.add_argument("--download", action="store_true", help="download a missing archive")
    parser.add_argument("--num_test", type=int, default=None, help="0: the whole test set")
    parser.add_argument("--num_train", type=int, default=None, help="head-training images")
    parser.add_argument(
        "--steps", type=int, default=None, help="head-training steps (0: 2 epochs of --num_train)"
    )
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--autoaugment", action="store_true", help="AutoAugment in head training")
    parser.add_argument("--positions", default="", help="e.g. 2,4,6 (default: every block)")
    parser.add_argument("--thresholds", default=",".join(f"{t:.2f}" for t in THRESHOLDS))
    parser.add_argument("--bn_as_bias", action="store_true")
    parser.add_argument("--include_upsample", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="", help="XLA compilation cache ('none': off)")
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.checkpoint is None and args.workdir is None:
        args.checkpoint = str(DEFAULT_CHECKPOINT)
    if args.data is None:
        args.data = proxy.default_data() if args.dataset == "cifar10" else ""
    return args


# --- the model ------------------------------------------------------------------------------


def load_source(args: argparse.Namespace) -> tuple[Architecture, dict, str]:
    """(architecture with its exit head, variables, label) of the checkpoint or workdir."""
    if args.checkpoint:
        from micronet_jax import load_original

        loaded = load_original(args.checkpoint)
        return loaded.arch, loaded.variables, str(args.checkpoint)
    return load_workdir(Path(args.workdir)) + (str(args.workdir),)


def load_workdir(workdir: Path) -> tuple[Architecture, dict]:
    """The last finished exit stage of a pipeline run, rebuilt from its config.json."""
    from ml_collections import ConfigDict

    from micronet_jax.config import builders
    from micronet_jax.recipe import stages

    config = ConfigDict(json.loads((workdir / "config.json").read_text()))
    stage = stages.last_exit_stage(config, workdir)
    arch = builders.architecture_from_config(config, with_exit=True)
    variables, _ = stages.load_final(config, stage, workdir / stage.name)
    return arch, variables


def with_fresh_head(arch: Architecture, variables: dict, position: int, seed: int):
    """(model, variables) with a newly initialised exit head after block `position`."""
    model = MicroNet(arch.with_exit_head(position))
    fresh = init_variables(model, jax.random.key(seed + position))
    params = {k: v for k, v in variables["params"].items() if k != "exit_head"}
    stats = {k: v for k, v in variables["batch_stats"].items() if k != "exit_head"}
    params["exit_head"] = fresh["params"]["exit_head"]
    stats["exit_head"] = fresh["batch_stats"]["exit_head"]
    return model, {"params": params, "batch_stats": stats}


def head_steps(args: argparse.Namespace, num_images: int) -> int:
    """--steps, or two epochs of the head-training images."""
    return args.steps or max(1, 2 * num_images // args.batch_size)


def train_head(
    model: MicroNet,
    variables: dict,
    images: np.ndarray,
    labels: np.ndarray,
    args: argparse.Namespace,
) -> dict:
    """A few SGD steps of the exit head alone; the main network's BN statistics are put back
    afterwards (training mode updates them, and the sweep must not change the main path)."""
    steps = head_steps(args, len(labels))
    tx = make_optimizer(args.lr, 1, steps)
    state = create_exit_state(model.apply, variables, tx, args.seed)
    cfg = StepConfig(
        mixup_alpha=0.0, autoaugment=args.autoaugment, lr_fn=cosine_per_epoch(args.lr, 1, steps)
    )
    step = jax.jit(functools.partial(exit_train_step, cfg=cfg))
    rng = np.random.default_rng(args.seed)
    key = jax.random.key(args.seed)
    for i in range(steps):
        idx = rng.choice(len(labels), args.batch_size, replace=False)
        batch = {"image": images[idx], "label": labels[idx].astype(np.int32)}
        state, _ = step(state, batch, jax.random.fold_in(key, i))
    trained = full_variables(state)
    stats = dict(variables["batch_stats"])
    stats["exit_head"] = trained["batch_stats"]["exit_head"]
    return {"params": trained["params"], "batch_stats": stats}


# --- one position -------------------------------------------------------------------------


def position_rows(
    arch: Architecture,
    variables: dict,
    head: str,
    main_logits: np.ndarray,
    exit_logits: np.ndarray,
    labels: np.ndarray,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """One row per threshold: the exit rule's metrics and the MicroNet count at its ratio."""
    params = variables["params"]
    main_sparsity, exit_sparsity = measured_sparsity(arch, params)
    opts = dict(bn_as_bias=args.bn_as_bias, include_upsample=args.include_upsample)

    def uniform(ratio: float) -> Any:
        return count_micronet(
            arch, sparsity=main_sparsity, exit_sparsity=exit_sparsity, exit_ratio=ratio, **opts
        )

    exit_ops, full_ops = uniform(1.0).math_ops, uniform(0.0).math_ops
    rows = []
    for threshold in parse_floats(args.thresholds):
        result = select_predictions(main_logits, exit_logits, threshold)
        metrics = exit_metrics(result, labels)
        ratio = metrics["exit_ratio"]
        count = uniform(ratio)
        rows.append(
            {
                "exit_block": arch.exit_head.after_block,
                "head": head,
                "threshold": threshold,
                "exit_ratio": ratio,
                "accuracy": metrics["accuracy"],
                "exit_head_accuracy": metrics["exit_head_accuracy"],
                "main_accuracy": metrics["main_accuracy"],
                "agreement": float(np.mean(result.predictions == result.main_predictions)),
                "exit_path_ops": exit_ops,
                "full_path_ops": full_ops,
                "exit_path_share": exit_ops / full_ops,
                "math_ops": count.math_ops,
                "param_score": count.param_score,
                "math_score": count.math_score,
                "score": count.score,
                "score_actual_masks": count_micronet(
                    arch, params=params, exit_ratio=ratio, **opts
                ).score,
                "sparsity": main_sparsity,
                "exit_sparsity": exit_sparsity,
            }
        )
    return rows


def parse_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def subset(images: np.ndarray, labels: np.ndarray, n: int, seed: int):
    """A fixed random subset (test sets are sorted by class in places)."""
    if not n or n >= len(labels):
        return images, labels
    idx = np.sort(np.random.default_rng(seed).permutation(len(labels))[:n])
    return images[idx], labels[idx]


def sweep(args: argparse.Namespace) -> tuple[list[dict[str, Any]], bool]:
    """Every (position, threshold) row, and whether the data has the model's classes."""
    arch, variables, _ = load_source(args)
    own = arch.exit_head.after_block
    test = load_cifar(args.dataset, args.data or None, "test", download=args.download)
    if test.num_classes > arch.num_classes:
        raise SystemExit(f"{args.dataset} has more classes than the model ({arch.num_classes})")
    test_images, test_labels = subset(test.images, test.labels, args.num_test, args.seed)
    positions = (
        [int(p) for p in args.positions.split(",")]
        if args.positions
        else list(range(len(arch.blocks) - 1))
    )
    train = None
    rows: list[dict[str, Any]] = []
    for position in positions:
        if position == own:
            model, pos_vars, head = MicroNet(arch), variables, "checkpoint's own"
        else:
            if train is None:
                full = load_cifar(args.dataset, args.data or None, "train", download=args.download)
                train = subset(full.images, full.labels, args.num_train, args.seed + 1)
            model, pos_vars = with_fresh_head(arch, variables, position, args.seed)
            pos_vars = train_head(model, pos_vars, *train, args)
            head = f"new ({head_steps(args, len(train[1]))} steps)"
        main_logits, exit_logits = predict(model.apply, pos_vars, test_images, 100)
        rows += position_rows(
            model.arch, pos_vars, head, main_logits, exit_logits, np.asarray(test_labels), args
        )
        print(f"exit after block {position}: done", flush=True)
    return rows, test.num_classes == arch.num_classes


def write(out: Path, rows: list[dict[str, Any]], args: argparse.Namespace, in_domain: bool) -> None:
    """JSON, CSV, Markdown and the Pareto plot. Out of domain, accuracy means nothing, so the
    plot shows how often the combined prediction agrees with the full network's instead."""
    from micronet_jax.evaluation.plots import plot_exit_tradeoff

    proxy.write_json(out / "exit_sweep.json", rows)
    domain = (
        "in domain"
        if in_domain
        else "out of domain: its classes are not the network's, so accuracies are near chance; "
        "exit ratios, agreement with the full network and costs are still meaningful"
    )
    notes = [
        f"Model: `{args.checkpoint or args.workdir}`. Test data: {args.num_test or 'all'} "
        f"{args.dataset} test images ({domain}).",
        "Score as `python -m micronet_jax.score` counts it: measured global sparsity applied "
        f"uniformly, 16-bit params/mults, BN {'as bias' if args.bn_as_bias else 'not counted'},"
        f" upsample {'counted' if args.include_upsample else 'not counted'}, measured exit "
        "ratio. `score_actual_masks`: each tensor's real mask. Ops are per image. "
        "`agreement`: share of images whose prediction is the full network's.",
    ]
    table = proxy.markdown_table(rows, COLUMNS)
    proxy.write_markdown(out / "exit_sweep.md", "Exit position × threshold sweep", notes, table)
    metric = (
        ("accuracy", "accuracy (%)")
        if in_domain
        else ("agreement", "agreement with the full network (%)")
    )
    plot_exit_tradeoff(
        [{k: r[k] for k in COLUMNS} for r in rows],
        out,
        f"Exit trade-off ({args.dataset}, {domain.split(':')[0]})",
        "exit_sweep",
        *metric,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = proxy.prepare(args)
    rows, in_domain = sweep(args)
    write(out, rows, args, in_domain)
    print((out / "exit_sweep.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
