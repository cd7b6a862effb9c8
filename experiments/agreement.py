"""Shared by the precision experiments: the released checkpoints, the images they are
measured on, and how far a changed network's predictions move from the float32 ones.

The released networks classify CIFAR-100; the images here are real CIFAR-10 (CIFAR-100 is not
at hand), outside the networks' classes. So the measure is agreement with the float32
network's own predictions (main path, exit path, and the combined prediction at the exit
threshold), not accuracy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.shared_data import REFERENCE
from experiments import proxy
from micronet_jax import predict, select_predictions
from micronet_jax.evaluation.early_exit import CONFIDENT, DEFAULT_THRESHOLD, top_probability

CHECKPOINTS = ("first_submission", "final_ee50")
THRESHOLD = DEFAULT_THRESHOLD
# the exit ratios each checkpoint was published with (CIFAR-100 test set)
PUBLISHED_RATIO = {"first_submission": 0.3217, "final_ee50": 0.2929}


@dataclasses.dataclass
class Outputs:
    """Both heads' logits on the measured images, and the combined prediction."""

    main: np.ndarray
    exit: np.ndarray
    threshold: float = THRESHOLD

    @property
    def combined(self) -> np.ndarray:
        return select_predictions(self.main, self.exit, self.threshold).predictions

    @property
    def exit_ratio(self) -> float:
        return select_predictions(self.main, self.exit, self.threshold).exit_ratio


def run(apply_fn: Callable, variables: dict, images: np.ndarray, batch: int = 500) -> Outputs:
    main, exits = predict(apply_fn, variables, images, batch)
    return Outputs(np.asarray(main, np.float32), np.asarray(exits, np.float32))


def agreement(got: Outputs, reference: Outputs) -> dict[str, float]:
    """Top-1 agreement of each path and of the combined prediction, the exit decisions that
    changed, and the largest logit differences. `confident_agreement` is the main path's on
    the images the float32 network is sure of (top probability ≥ CONFIDENT): on images
    outside its classes most predictions are near ties that any rounding flips, so this is
    the closer stand-in for behaviour on its own classes."""
    same_exit = np.mean(
        select_predictions(got.main, got.exit, got.threshold).exited
        == select_predictions(reference.main, reference.exit, reference.threshold).exited
    )
    same_main = got.main.argmax(-1) == reference.main.argmax(-1)
    confident = top_probability(reference.main) >= CONFIDENT
    return {
        "kl_divergence": mean_kl(reference.main, got.main),
        "top5_overlap": top_k_overlap(reference.main, got.main, 5),
        "main_agreement": float(np.mean(same_main)),
        "exit_agreement": float(np.mean(got.exit.argmax(-1) == reference.exit.argmax(-1))),
        "combined_agreement": float(np.mean(got.combined == reference.combined)),
        "exit_decisions_kept": float(same_exit),
        "confident_agreement": float(np.mean(same_main[confident])) if confident.any() else 1.0,
        "confident_share": float(np.mean(confident)),
        "exit_ratio": got.exit_ratio,
        "max_logit_diff_main": float(np.max(np.abs(got.main - reference.main))),
        "max_logit_diff_exit": float(np.max(np.abs(got.exit - reference.exit))),
    }


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def mean_kl(reference: np.ndarray, got: np.ndarray) -> float:
    """Mean KL(float32 ‖ changed) of the two softmax distributions, in nats: unlike top-1
    agreement it sees every probability move, not only the near ties that flip."""
    log_p, log_q = _log_softmax(reference), _log_softmax(got)
    return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))


def top_k_overlap(reference: np.ndarray, got: np.ndarray, k: int) -> float:
    """The mean share of the float32 network's top-k classes that are also the changed
    network's top-k."""
    top_ref = np.argsort(-reference, axis=-1)[:, :k]
    top_got = np.argsort(-got, axis=-1)[:, :k]
    shared = (top_ref[:, :, None] == top_got[:, None, :]).any(-1).sum(-1)
    return float(np.mean(shared) / k)


def near_ties(reference: Outputs) -> str:
    """How close the float32 network's main-path decisions are on the measured images."""
    top2 = np.sort(reference.main, axis=-1)[:, -2:]
    gap = np.median(top2[:, 1] - top2[:, 0])
    top = top_probability(reference.main)
    return (
        f"median gap between the two largest logits {gap:.2f}, median top probability "
        f"{np.median(top):.2f}, {np.mean(top >= CONFIDENT):.1%} of the images at or above "
        f"{CONFIDENT} (the confident ones)"
    )


def checkpoint_path(root: Path, name: str) -> Path:
    path = root / name / "trained_model.pth"
    if not path.exists():
        raise SystemExit(f"error: no checkpoint at {path} (pass --checkpoints=DIR)")
    return path


def measured_images(
    data: str, num_test: int, num_calibration: int
) -> tuple[np.ndarray, np.ndarray]:
    """(test images, calibration images): the first `num_test` test images of the archive
    (CIFAR-10's, or CIFAR-100's when its name says so), and `num_calibration` training images
    (apart from the measured ones)."""
    from micronet_jax import load_train_test

    if not data:
        raise SystemExit("error: no CIFAR-10 archive; pass --data=PATH/cifar-10-python.tar.gz")
    name = "cifar100" if "100" in Path(data).name else "cifar10"  # the networks' own classes
    train, test = load_train_test(name, data, download=False)
    return test.images[:num_test], train.images[:num_calibration]


def add_common_args(parser: Any) -> None:
    parser.add_argument("--out", required=True, help="folder for the table, CSV and JSON")
    parser.add_argument("--data", default=proxy.default_data(), help="cifar-10-python.tar.gz")
    parser.add_argument("--checkpoints", type=Path, default=REFERENCE, help="the original's")
    parser.add_argument("--num_test", type=int, default=10_000, help="measured test images")
    parser.add_argument("--batch_size", type=int, default=500)


def write(out: Path, name: str, title: str, notes: list[str], rows: list[dict], columns) -> str:
    """CSV, JSON and a Markdown table under `out`; the table's text."""
    out.mkdir(parents=True, exist_ok=True)
    proxy.write_csv(out / f"{name}.csv", rows, columns)
    proxy.write_json(out / f"{name}.json", {"rows": rows, "notes": notes})
    table = proxy.markdown_table(rows, columns)
    proxy.write_markdown(out / f"{name}.md", title, notes, table)
    return table
