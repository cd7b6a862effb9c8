"""Wall-clock gain of fast early-exit inference vs the full network on every sample.

    python benchmarks/early_exit.py [--batch 512] [--images 2048] [--ratio 0.32] [--repeats 3]

Uses the original's first-submission checkpoint when ../shared is present (else a randomly
initialised model with the same architecture) on real CIFAR-10 test images, picks the threshold
that makes about `--ratio` of them exit, and compares the measured time saving with the saving
the MicroNet operation count predicts for that exit ratio.
"""

from __future__ import annotations

import argparse
import functools
import pickle
import statistics
import tarfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from micronet_jax.data.augment import eval_transform
from micronet_jax.inference import exit_confidence, exit_predict_exact, exit_predict_fast
from micronet_jax.models.architecture import build_architecture
from micronet_jax.models.efficientnet import MicroNet, init_variables
from micronet_jax.models.microbatch import default_micro_batch, map_micro_batches
from micronet_jax.scoring import count_micronet

SHARED = Path(__file__).resolve().parents[2] / "shared"


def load_model() -> tuple[MicroNet, dict, str]:
    pth = SHARED / "reference" / "osi_ai" / "first_submission" / "trained_model.pth"
    if pth.exists():
        from micronet_jax.convert import load_original

        ckpt = load_original(pth)
        return ckpt.model, ckpt.variables, "original first-submission checkpoint"
    model = MicroNet(build_architecture(exit_block=4))
    return model, init_variables(model, jax.random.key(0)), "random init (no ../shared)"


def load_images(n: int) -> np.ndarray:
    archive = SHARED / "data" / "cifar-10-python.tar.gz"
    if not archive.exists():
        return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    with tarfile.open(archive) as tar:
        batch = pickle.load(tar.extractfile("cifar-10-batches-py/test_batch"), encoding="bytes")
    return batch[b"data"][:n].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()


@functools.partial(jax.jit, static_argnums=0)
def _full(model: MicroNet, variables: dict, images: jax.Array) -> jax.Array:
    """The main network alone, every sample: what inference costs without early exit."""

    def forward(batch):
        features = model.apply(variables, eval_transform(batch), method=MicroNet.trunk)
        return model.apply(variables, features, method=MicroNet.tail)

    return map_micro_batches(forward, images, default_micro_batch()).argmax(-1)


def time_full(model, variables, images, batch) -> float:
    tic = time.perf_counter()
    for start in range(0, len(images), batch):
        _full(model, variables, jnp.asarray(images[start : start + batch])).block_until_ready()
    return time.perf_counter() - tic


def time_fast(model, variables, images, threshold, batch) -> float:
    tic = time.perf_counter()
    exit_predict_fast(model, variables, images, threshold, batch_size=batch)
    return time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--ratio", type=float, default=0.32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model, variables, source = load_model()
    images = load_images(args.images)
    confidences = []
    for start in range(0, len(images), args.batch):
        chunk = jnp.asarray(images[start : start + args.batch])
        _, logits = model.apply(variables, eval_transform(chunk))
        confidences.append(np.asarray(exit_confidence(logits)))
    confidence = np.concatenate(confidences)
    threshold = float(np.quantile(confidence, 1.0 - args.ratio))
    ratio = float(np.mean(confidence > threshold))

    fast = exit_predict_fast(model, variables, images, threshold, batch_size=args.batch)
    check = exit_predict_exact(model, variables, images, threshold, args.batch)
    assert np.array_equal(fast.predictions, check.predictions), "fast != exact predictions"

    time_full(model, variables, images, args.batch)  # warm-up / compile
    time_fast(model, variables, images, threshold, args.batch)
    full_t, fast_t = [], []
    for _ in range(args.repeats):
        full_t.append(time_full(model, variables, images, args.batch))
        fast_t.append(time_fast(model, variables, images, threshold, args.batch))
    full_s, fast_s = statistics.median(full_t), statistics.median(fast_t)

    main_arch = model.arch.with_exit_head(None)
    full_ops = count_micronet(main_arch).math_ops
    exit_ops = count_micronet(model.arch, exit_ratio=ratio).math_ops
    predicted = 1.0 - exit_ops / full_ops
    measured = 1.0 - fast_s / full_s
    print(
        f"model: {source}; device: {jax.devices()[0].device_kind}; batch {args.batch}; "
        f"{len(images)} images; threshold {threshold:.4f} -> exit ratio {ratio:.4f}"
    )
    print(
        f"full network, every sample : {len(images) / full_s:9.1f} images/s "
        f"(median of {args.repeats})"
    )
    print(f"fast early exit            : {len(images) / fast_s:9.1f} images/s")
    print(
        f"time saved: measured {measured:.1%}, predicted by op count {predicted:.1%} "
        f"-> {measured / predicted:.0%} of the predicted gain"
    )


if __name__ == "__main__":
    main()
