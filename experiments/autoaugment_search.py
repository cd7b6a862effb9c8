"""TPE search of an AutoAugment policy: 25 sub-policies, each trial scored by a proxy training.

As the original searched its CIFAR-100 policy: every sub-policy is (op1, p1, m1,
op2, p2, m2) with ops from the 14 AutoAugment ops, probabilities U(0, 1) and magnitudes
0..9; a trial trains a network briefly with the candidate policy and is scored by its
validation loss on images held out of the training set.

    python -m experiments.autoaugment_search --out=runs/aa_search              # CPU, minutes
    python -m experiments.autoaugment_search --out=runs/aa_search --preset=full # accelerator

`--preset=full`: CIFAR-100, 45k/5k split, the original's network, 1-epoch proxy, 100 trials.
Writes trials.csv/.json/.md, trials.png and best_policy.json, which a run uses with
`--config.data.policy=OUT/best_policy.json`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from experiments import proxy
from micronet_jax import Architecture, build_architecture
from micronet_jax.data.autoaugment import OPS
from micronet_jax.data.policy import NUM_MAGNITUDES, Policy
from micronet_jax.errors import CommandParser

OP_NAMES: tuple[str, ...] = tuple(OPS)
NUM_SUBPOLICIES = 25
COLUMNS = (
    "trial",
    "val_loss",
    "val_accuracy",
    "train_loss",
    "mean_probability",
    "mean_magnitude",
    "seconds",
)


def suggest_policy(trial: Any, num_subpolicies: int = NUM_SUBPOLICIES) -> list[list]:
    """The rows of one candidate policy, drawn from the trial's sampler."""
    rows = []
    for i in range(num_subpolicies):
        row: list = []
        for stage in (1, 2):
            row.append(trial.suggest_categorical(f"op{stage}_{i}", OP_NAMES))
            row.append(trial.suggest_float(f"p{stage}_{i}", 0.0, 1.0))
            row.append(trial.suggest_int(f"m{stage}_{i}", 0, NUM_MAGNITUDES - 1))
        rows.append(row)
    return rows


def strength(policy: Sequence[Sequence]) -> dict[str, float]:
    """How strong a policy is on average: firing probability and magnitude index of its ops."""
    probs = [row[k] for row in policy for k in (1, 4)]
    mags = [row[k] for row in policy for k in (2, 5)]
    return {"mean_probability": sum(probs) / len(probs), "mean_magnitude": sum(mags) / len(mags)}


def proxy_network(kind: str, num_classes: int) -> Architecture:
    if kind == "full":
        return build_architecture(num_classes=num_classes)
    return build_architecture(
        proxy.TINY_BLOCKS, width=1.0, resolution=1.0, head_filters=64, num_classes=num_classes
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = CommandParser(
        prog="python -m experiments.autoaugment_search", description=__doc__.splitlines()[0]
    )
    proxy.add_proxy_args(parser)
    parser.add_argument("--subpolicies", type=int, default=NUM_SUBPOLICIES)
    return proxy.finish_args(parser.parse_args(argv))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the search; write every output file; return the best trial's record."""
    out = proxy.prepare(args)
    split = proxy.split_from(args)
    arch = proxy_network(args.proxy, split.num_classes)
    settings = proxy.settings_from(args, autoaugment=True)
    study = proxy.tpe_study(args.seed, args.startup_trials)
    rows: list[dict[str, Any]] = []
    policies: list[list[list]] = []

    def objective(trial: Any) -> float:
        policy = suggest_policy(trial, args.subpolicies)
        Policy.from_rows(policy)  # a malformed candidate fails here, not inside jit
        result = proxy.proxy_train(arch, split, settings, policy)
        rows.append({"trial": trial.number, **result, **strength(policy)})
        policies.append(policy)
        print(
            f"trial {trial.number}: val loss {result['val_loss']:.4f} ({result['seconds']:.0f}s)",
            flush=True,
        )
        return result["val_loss"]

    study.optimize(objective, n_trials=args.trials)
    best = study.best_trial.number
    proxy.write_json(out / "best_policy.json", policies[best])
    proxy.write_json(
        out / "trials.json", [r | {"policy": p} for r, p in zip(rows, policies, strict=True)]
    )
    proxy.write_csv(out / "trials.csv", rows, COLUMNS)
    notes = [
        f"{args.dataset}: {args.num_train} training / {args.num_val} validation images (both "
        f"from the training set); proxy network `{args.proxy}`, {args.epochs} epoch(s) per trial.",
        f"Best: trial {best}, validation loss {rows[best]['val_loss']:.4f}; policy in "
        "`best_policy.json` (use `--config.data.policy=` with it).",
    ]
    table = proxy.markdown_table(rows, COLUMNS)
    proxy.write_markdown(out / "trials.md", "AutoAugment policy search (TPE)", notes, table)
    proxy.trial_plot(out / "trials.png", rows, "AutoAugment search: validation loss per trial")
    return rows[best]


def main(argv: Sequence[str] | None = None) -> int:
    best = run(parse_args(argv))
    print(json.dumps(best, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
