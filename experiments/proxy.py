"""Shared by every search: a 45k/5k-style split, a short proxy training, and result files.

A trial is scored as the original scored its searches: validation loss (plain cross entropy)
after a short training run on a held-out part of the training set, never the test set.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from benchmarks.shared_data import CIFAR10_ARCHIVE
from micronet_jax import (
    Architecture,
    DeviceData,
    MicroNet,
    Schedule,
    StepConfig,
    create_train_state,
    evaluate,
    init_variables,
    make_optimizer,
    run_epoch,
)
from micronet_jax.data.cifar import load_cifar
from micronet_jax.train.optim import cosine_per_epoch
from micronet_jax.train.steps import step_function

SHARED_CIFAR10 = CIFAR10_ARCHIVE

# The tiny network small-scale searches train (tests/configs/tiny.py's shape, a bit wider).
TINY_BLOCKS: tuple[str, ...] = (
    "r1_k3_s1_e1_i16_o16_se0.25",
    "r1_k3_s2_e4_i16_o24_se0.25",
    "r1_k3_s1_e4_i24_o24_se0.25",
)


@dataclasses.dataclass(frozen=True)
class ProxySettings:
    """How one trial trains; defaults are a CPU-sized run (full scale: see each script)."""

    epochs: int = 1
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-5
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    autoaugment: bool = True
    eval_batch_size: int = 250
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Split:
    """Training and validation images, both carved out of the training set."""

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    num_classes: int


def default_data() -> str:
    """The real CIFAR-10 archive beside the repository, else the default data folder."""
    return str(SHARED_CIFAR10) if SHARED_CIFAR10.exists() else ""


def load_split(
    data: str, name: str, num_train: int, num_val: int, seed: int = 0, download: bool = False
) -> Split:
    """A random train/validation split of the training set (the original's 45k/5k).

    `num_train`/`num_val` 0 means 'all the rest' / 5000.
    """
    full = load_cifar(name, data or None, "train", download=download)
    num_val = num_val or 5000
    num_train = num_train or len(full) - num_val
    if num_train + num_val > len(full):
        raise ValueError(f"{num_train}+{num_val} images asked, the training set has {len(full)}")
    perm = np.random.default_rng(seed).permutation(len(full))
    tr, va = np.sort(perm[:num_train]), np.sort(perm[num_train : num_train + num_val])
    return Split(
        full.images[tr], full.labels[tr], full.images[va], full.labels[va], full.num_classes
    )


def proxy_train(
    arch: Architecture, split: Split, settings: ProxySettings, policy: Any = None
) -> dict[str, float]:
    """Train `arch` briefly from scratch; validation loss/accuracy and seconds taken."""
    tic = time.perf_counter()
    model = MicroNet(arch)
    schedule = Schedule(
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        num_examples=len(split.train_labels),
        drop_last=True,  # one batch shape: one compilation per trial
        eval_every=settings.epochs,
        checkpoint_every=settings.epochs,
    )
    spe = schedule.steps_per_epoch
    tx = make_optimizer(settings.lr, settings.epochs, spe, settings.momentum, settings.weight_decay)
    lr_fn = cosine_per_epoch(settings.lr, settings.epochs, spe)
    variables = init_variables(model, jax.random.key(settings.seed))
    state = create_train_state(model.apply, variables, tx, settings.seed)
    cfg = StepConfig(
        label_smoothing=settings.label_smoothing,
        mixup_alpha=settings.mixup_alpha,
        autoaugment=settings.autoaugment,
        policy=None if policy is None else tuple(tuple(r) for r in policy),
        lr_fn=lr_fn,
    )
    data = DeviceData.from_numpy(split.train_images, split.train_labels)
    train_loss = float("nan")
    for epoch in range(1, settings.epochs + 1):
        state, averages = run_epoch(state, step_function(cfg), data, schedule, epoch)
        train_loss = float(averages["loss"])
    val = evaluate(state, model.apply, split.val_images, split.val_labels, settings.eval_batch_size)
    return {
        "train_loss": train_loss,
        "val_loss": val["loss"],
        "val_accuracy": val["accuracy"],
        "seconds": time.perf_counter() - tic,
    }


# --- result files ----------------------------------------------------------------------


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> Path:
    """One row per trial, the given columns in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_markdown(path: Path, title: str, notes: Sequence[str], table: str) -> Path:
    path.write_text("\n\n".join([f"# {title}", *notes, table]) + "\n")
    return path


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def trial_plot(path: Path, rows: Sequence[dict[str, Any]], title: str) -> Path:
    """Validation loss per trial and the best so far (how the search went); with MicroNet
    scores, a second panel of loss against score (what each candidate would cost)."""
    from micronet_jax.evaluation.plots import pyplot

    plt = pyplot()
    with_score = "score" in rows[0]
    fig, axes = plt.subplots(1, 2 if with_score else 1, figsize=(11 if with_score else 6, 4))
    ax = axes[0] if with_score else axes
    trials = [r["trial"] for r in rows]
    values = [r["val_loss"] for r in rows]
    ax.plot(trials, values, "o", label="trial")
    ax.plot(trials, np.minimum.accumulate(values), "-", drawstyle="steps-post", label="best so far")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("trial")
    ax.set_ylabel("validation loss (cross entropy)")
    ax.set_title(title)
    ax.legend()
    if with_score:
        ax = axes[1]
        ax.scatter([r["score"] for r in rows], values, label="trial")
        for r in rows:
            ax.annotate(
                str(r["trial"]),
                (r["score"], r["val_loss"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.set_xlabel("MicroNet score of the candidate (dense)")
        ax.set_ylabel("validation loss (cross entropy)")
        ax.set_title("Validation loss vs MicroNet score")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tpe_study(seed: int, startup_trials: int) -> Any:
    """A seeded TPE study minimising validation loss (hyperopt's algorithm, in optuna)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials)
    return optuna.create_study(direction="minimize", sampler=sampler)


# --- command line shared by the searches ---------------------------------------------------

# Small: minutes on a CPU (real CIFAR-10, 900/100 images, the tiny network, 1 epoch).
# Full: the original's setting (CIFAR-100, 45k/5k, the searched network, 1-epoch proxy).
PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(
        dataset="cifar10",
        num_train=900,
        num_val=100,
        epochs=2,
        batch_size=64,
        trials=4,
        startup_trials=2,
        proxy="tiny",
    ),
    "full": dict(
        dataset="cifar100",
        num_train=45000,
        num_val=5000,
        epochs=1,
        batch_size=128,
        trials=100,
        startup_trials=10,
        proxy="full",
    ),
}


def add_proxy_args(parser: Any) -> Any:
    """Flags every search shares; unset ones take the --preset's value."""
    parser.add_argument("--out", required=True, help="folder for CSV/JSON/Markdown/PNG")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--data", default=None, help="archive or folder (default: ../shared)")
    parser.add_argument("--dataset", choices=("cifar10", "cifar100"), default=None)
    parser.add_argument("--download", action="store_true", help="download a missing archive")
    parser.add_argument("--num_train", type=int, default=None)
    parser.add_argument("--num_val", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None, help="proxy epochs per trial")
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--startup_trials", type=int, default=None, help="random before TPE")
    parser.add_argument(
        "--proxy",
        choices=("tiny", "full"),
        default=None,
        help="network trained per trial: tiny (CPU) or the searched one",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="", help="XLA compilation cache ('none': off)")
    return parser


def finish_args(args: Any) -> Any:
    """Fill unset flags from the preset; resolve the data path."""
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.data is None:
        args.data = default_data() if args.dataset == "cifar10" else ""
    return args


def settings_from(args: Any, **overrides: Any) -> ProxySettings:
    fields = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    return ProxySettings(**(fields | overrides))


def split_from(args: Any) -> Split:
    return load_split(
        args.data, args.dataset, args.num_train, args.num_val, args.seed, args.download
    )


def prepare(args: Any) -> Path:
    """Output folder and compilation cache, before anything compiles."""
    from micronet_jax import enable_compilation_cache

    enable_compilation_cache(args.cache)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def micronet_numbers(arch: Architecture) -> dict[str, float]:
    """The dense MicroNet count of a candidate (16-bit, BN not counted, as `score` prints)."""
    from micronet_jax import count_micronet

    count = count_micronet(arch)
    return {
        "params": count.params,
        "math_ops": count.math_ops,
        "param_score": count.param_score,
        "math_score": count.math_score,
        "score": count.score,
    }


def write_outputs(
    out: Path,
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    title: str,
    notes: Sequence[str],
) -> None:
    """trials.csv, trials.json, trials.md and trials.png of a finished search."""
    write_csv(out / "trials.csv", rows, columns)
    write_json(out / "trials.json", list(rows))
    write_markdown(out / "trials.md", title, notes, markdown_table(rows, columns))
    trial_plot(out / "trials.png", rows, f"{title}: validation loss per trial")


def search(
    study: Any,
    args: Any,
    out: Path,
    measure: Any,
    columns: Sequence[str],
    title: str,
    notes: Sequence[str],
) -> list[dict[str, Any]]:
    """Run `args.trials` trials of `study`, each `measure(trial)` -> (its row with
    `val_loss` and `score`, a label for its progress line); write the outputs under `out`
    with the data, `notes` and the best trial; return the rows."""
    rows: list[dict[str, Any]] = []

    def objective(trial: Any) -> float:
        row, label = measure(trial)
        rows.append({"trial": trial.number, **row})
        print(
            f"trial {trial.number}: {label}val loss {row['val_loss']:.4f}, score "
            f"{row['score']:.6f} ({row['seconds']:.0f}s)",
            flush=True,
        )
        return row["val_loss"]

    study.optimize(objective, n_trials=args.trials)
    best = f"Best by validation loss: trial {study.best_trial.number}."
    write_outputs(out, rows, columns, title, [data_note(args), *notes, best])
    return rows


def print_best(rows: Sequence[dict[str, Any]]) -> None:
    """The trial of lowest validation loss, as the search's last output."""
    print(json.dumps(min(rows, key=lambda r: r["val_loss"]), indent=2))


def data_note(args: Any) -> str:
    return (
        f"{args.dataset}: {args.num_train} training / {args.num_val} validation images (both "
        f"from the training set); proxy network `{args.proxy}`, {args.epochs} epoch(s) per "
        f"trial, seed {args.seed}."
    )
