"""Does the JAX recipe learn like the original? The same recipe, steps and data in both.

The full-size network, the whole recipe (AutoAugment, crop, flip, mixup, label smoothing,
SGD with coupled weight decay, per-epoch cosine) on a subset of the real CIFAR-10 training
set, then top-1 on all 10,000 test images. JAX runs `train_and_evaluate`; PyTorch runs the
independent implementation in `benchmarks/torch_micronet.py` with per-image PIL augmentation,
as the original did.

    python -m benchmarks.learning_check --framework both [--num_train 10240] [--epochs 5]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.shared_data import DATA
from micronet_jax.errors import CommandParser

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = DATA


def recipe_config(args: argparse.Namespace):
    from micronet_jax import default_config

    config = default_config()
    config.data.name = "cifar10"
    config.data.dir = str(args.data)
    config.data.download = False
    config.data.num_train = args.num_train
    config.data.num_test = args.num_test
    config.train.epochs = args.epochs
    config.train.eval_every = args.epochs
    config.train.checkpoint_every = args.epochs
    config.seed = args.seed
    return config


def run_jax(args: argparse.Namespace) -> dict:
    from micronet_jax import train_and_evaluate

    config = recipe_config(args)
    with tempfile.TemporaryDirectory() as workdir:
        tic = time.time()
        _, records = train_and_evaluate(config, workdir)
    last = records[-1]
    return {
        "framework": "jax",
        "steps": last["step"],
        "train_loss": [r["train_loss"] for r in records],
        "test_accuracy": last["test_accuracy"],
        "seconds": time.time() - tic,
    }


def run_torch(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    import pil_reference

    from benchmarks import torch_micronet
    from micronet_jax.config import builders
    from micronet_jax.data.policy import CIFAR100_ROWS

    config = recipe_config(args)
    train, test = builders.load_data(config)
    torch.manual_seed(args.seed)
    model = torch_micronet.TorchMicroNet(builders.architecture_from_config(config))
    optimizer = torch_micronet.make_optimizer(model, config.train.lr)
    rng = random.Random(args.seed)
    batch = config.train.batch_size
    steps, losses = 0, []
    tic = time.time()
    for epoch in range(1, args.epochs + 1):
        lr = config.train.lr * 0.5 * (1 + math.cos(math.pi * epoch / args.epochs))
        for group in optimizer.param_groups:
            group["lr"] = lr
        order = np.random.default_rng(args.seed + epoch).permutation(len(train))
        model.train()
        epoch_loss = []
        for start in range(0, len(order) - len(order) % 4, batch):
            idx = order[start : start + batch]
            x, ya, yb, lam = pil_reference.train_batch(
                train.images[idx], train.labels[idx], CIFAR100_ROWS, rng
            )
            x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
            loss = torch_micronet.train_step(
                model, optimizer, x, torch.from_numpy(ya).long(), torch.from_numpy(yb).long(), lam
            )
            epoch_loss.append(float(loss))
            steps += 1
        losses.append(float(np.mean(epoch_loss)))
    model.eval()
    correct = 0
    mean = np.asarray(pil_reference.CIFAR100_MEAN, np.float32)
    std = np.asarray(pil_reference.CIFAR100_STD, np.float32)
    with torch.no_grad():
        for start in range(0, len(test), 500):
            x = (test.images[start : start + 500] / 255.0 - mean) / std
            x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2), np.float32))
            pred = model(x).argmax(-1).numpy()
            correct += int((pred == test.labels[start : start + 500]).sum())
    return {
        "framework": "torch",
        "steps": steps,
        "train_loss": losses,
        "test_accuracy": correct / len(test),
        "seconds": time.time() - tic,
    }


def main() -> None:
    parser = CommandParser(
        prog="python -m benchmarks.learning_check", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--framework", choices=("jax", "torch", "both"), default="both")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--num_train", type=int, default=10240)
    parser.add_argument(
        "--num_test", type=int, default=0, help="test images scored (0: all 10,000)"
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="append results as JSON lines")
    args = parser.parse_args()
    runs = ("jax", "torch") if args.framework == "both" else (args.framework,)
    for name in runs:
        result = run_jax(args) if name == "jax" else run_torch(args)
        result.update(
            num_train=args.num_train, num_test=args.num_test, epochs=args.epochs, seed=args.seed
        )
        print(json.dumps(result))
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
