"""Wall-clock gain of fast early-exit inference vs the full network on every sample.

    python -m benchmarks.early_exit [--batch 512] [--images 2048] [--ratio 0.32] [--repeats 5]
                                    [--cpu-devices 0] [--cheap-swish]

Uses the original's first-submission checkpoint when ../shared is present (else a randomly
initialised model with the same architecture) on real CIFAR-10 test images, picks the threshold
that makes about `--ratio` of them exit, and compares the measured time saving with the saving
the MicroNet operation count predicts for that exit ratio. It also times the trunk alone, to
split the fast path's floor (trunk + exit head) and print the saving attainable at the measured
costs: what any implementation that skips the tail exactly for the exiting samples could get;
and the ceiling at the trunk's measured share, with an exit head no dearer than its operation
count and no work of the fast path's own.
"""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.shared_data import CIFAR10_ARCHIVE, checkpoint
from micronet_jax import (
    MicroNet,
    build_architecture,
    count_micronet,
    eval_transform,
    exit_predict_fast,
    init_variables,
    predict,
    select_predictions,
    use_cpu_cores,
)
from micronet_jax.errors import CommandParser
from micronet_jax.evaluation.early_exit import exit_confidence
from micronet_jax.models.microbatch import map_eval_batch


def load_model() -> tuple[MicroNet, dict, str]:
    pth = checkpoint("first_submission")
    if pth.exists():
        from micronet_jax import load_original

        ckpt = load_original(pth)
        return ckpt.model, ckpt.variables, "original first-submission checkpoint"
    model = MicroNet(build_architecture(exit_block=4))
    return model, init_variables(model, jax.random.key(0)), "random init (no ../shared)"


def load_images(n: int) -> np.ndarray:
    archive = CIFAR10_ARCHIVE
    if not archive.exists():
        return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    from micronet_jax import load_train_test

    _, test = load_train_test("cifar10", str(archive), download=False)
    return test.images[:n]


@functools.partial(jax.jit, static_argnums=(0, 3))
def _full(model: MicroNet, variables: dict, images: jax.Array, split: bool) -> jax.Array:
    """The main network alone, every sample: what inference costs without early exit. With
    `split` False the batch stays on one device, every core on each operation (what
    `--cpu-devices 1` runs)."""

    def forward(batch):
        features = model.apply(variables, eval_transform(batch), method=MicroNet.trunk)
        return model.apply(variables, features, method=MicroNet.tail)

    return map_eval_batch(forward, images, split).argmax(-1)


@functools.partial(jax.jit, static_argnums=0)
def _trunk(model: MicroNet, variables: dict, images: jax.Array) -> jax.Array:
    """The trunk alone, every sample (pooled, so that nothing large is returned)."""

    def forward(batch):
        features = model.apply(variables, eval_transform(batch), method=MicroNet.trunk)
        return features.mean(axis=(1, 2))

    return map_eval_batch(forward, images)


def use_cheap_swish() -> None:
    """Swap swish for hard swish, x·clip(0.5 + 0.2x, 0, 1), in every model module (before
    anything is traced): the same shape of function without the exponential."""
    from micronet_jax.models import efficientnet, exit_head, layers

    for module in (layers, efficientnet, exit_head):
        module.swish = lambda x: x * jnp.clip(0.5 + 0.2 * x, 0.0, 1.0)


def run_full(model: MicroNet, variables: dict, batch: np.ndarray, split: bool = True) -> None:
    images = jnp.asarray(batch) if split else jax.device_put(batch, jax.devices()[0])
    np.asarray(_full(model, variables, images, split))


def run_trunk(model: MicroNet, variables: dict, batch: np.ndarray) -> None:
    np.asarray(_trunk(model, variables, jnp.asarray(batch)))


def run_fast(model: MicroNet, variables: dict, batch: np.ndarray, threshold: float) -> None:
    exit_predict_fast(model, variables, batch, threshold, batch_size=len(batch))


def interleaved_times(runners: dict, batches: list, repeats: int) -> dict[str, list[float]]:
    """Seconds per pass over all batches, for each runner, measured batch by batch with the
    runners' order alternating, so that a machine whose speed drifts favours none of them."""
    names = list(runners)
    totals = {name: [] for name in names}
    for rep in range(repeats):
        spent = dict.fromkeys(names, 0.0)
        for b, batch in enumerate(batches):
            order = names if (rep + b) % 2 == 0 else names[::-1]
            for name in order:
                tic = time.perf_counter()
                runners[name](batch)
                spent[name] += time.perf_counter() - tic
        for name in names:
            totals[name].append(spent[name])
    return totals


def main() -> None:
    parser = CommandParser(
        prog="python -m benchmarks.early_exit", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--ratio", type=float, default=0.32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--cheap-swish",
        action="store_true",
        help="diagnostic: hard swish instead of swish (no exponential; other predictions, "
        "same shapes) to show how much of the trunk's excess time the exponential is",
    )
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=0,
        help="CPU devices to split each batch over, one per core (0: all cores; 1: one "
        "device whose operations use every core)",
    )
    args = parser.parse_args()
    cpu_devices = use_cpu_cores(args.cpu_devices or None)
    if args.cheap_swish:
        use_cheap_swish()

    model, variables, source = load_model()
    images = load_images(args.images)
    main_logits, exit_logits = predict(model.apply, variables, images, args.batch)
    confidence = np.asarray(exit_confidence(jnp.asarray(exit_logits)))
    threshold = float(np.quantile(confidence, 1.0 - args.ratio))
    ratio = float(np.mean(confidence > threshold))

    fast = exit_predict_fast(model, variables, images, threshold, batch_size=args.batch)
    check = select_predictions(main_logits, exit_logits, threshold)  # the exact path
    assert np.array_equal(fast.predictions, check.predictions), "fast != exact predictions"

    batches = [images[start : start + args.batch] for start in range(0, len(images), args.batch)]
    runners = {
        "full": functools.partial(run_full, model, variables),
        "fast": functools.partial(run_fast, model, variables, threshold=threshold),
        # every sample exits: the trunk and exit head alone, the fast path's floor
        "floor": functools.partial(run_fast, model, variables, threshold=1e-9),
        "trunk": functools.partial(run_trunk, model, variables),
    }
    split = jax.default_backend() == "cpu" and jax.device_count() > 1
    if split:
        runners["one device"] = functools.partial(run_full, model, variables, split=False)
    for run in runners.values():  # compile
        run(batches[0])
    times = interleaved_times(runners, batches, args.repeats)
    full_s, fast_s, floor_s, trunk_s = (
        statistics.median(times[k]) for k in ("full", "fast", "floor", "trunk")
    )
    measured = statistics.median(
        1.0 - f / g for f, g in zip(times["fast"], times["full"], strict=True)
    )

    main_arch = model.arch.with_exit_head(None)
    full_ops = count_micronet(main_arch).math_ops
    exit_ops = count_micronet(model.arch, exit_ratio=ratio).math_ops
    floor_ops = count_micronet(model.arch, exit_ratio=1.0).math_ops
    head_ops = count_micronet(model.arch, exit_ratio=0.0).math_ops - full_ops
    trunk_ops = floor_ops - head_ops
    trunk_share, head_share = trunk_s / full_s, (floor_s - trunk_s) / full_s
    # what skipping the tail for every exiting sample could save at these measured costs:
    # the tail's share of the time, not of the operations, is what an exit can skip
    attainable = ratio * (1.0 - trunk_share) - head_share
    predicted = 1.0 - exit_ops / full_ops
    print(
        f"model: {source}; device: {jax.devices()[0].device_kind} "
        f"({cpu_devices if jax.default_backend() == 'cpu' else jax.device_count()} devices); "
        f"batch {args.batch}; "
        f"{len(images)} images; threshold {threshold:.4f} -> exit ratio {ratio:.4f}"
    )
    print(
        f"full network, every sample : {len(images) / full_s:9.1f} images/s "
        f"(median of {args.repeats} interleaved passes)"
    )
    if split:
        one_s = statistics.median(times["one device"])
        print(
            f"  the same on one CPU device : {len(images) / one_s:9.1f} images/s "
            f"(the split over {jax.device_count()} is {one_s / full_s:.2f}x as fast)"
        )
    print(f"fast early exit            : {len(images) / fast_s:9.1f} images/s")
    print(
        f"time saved: measured {measured:.1%} (median over passes), predicted by op count "
        f"{predicted:.1%} -> {measured / predicted:.0%} of the predicted gain"
    )
    print(
        f"trunk + exit head on every sample: {floor_s / full_s:.1%} of the full network's time, "
        f"{floor_ops / full_ops:.1%} of its operations"
    )
    print(
        f"  of which the trunk {trunk_share:.1%} of the time ({trunk_ops / full_ops:.1%}"
        f" of the operations), the exit head and the fast path's fixed work {head_share:.1%}"
        f" ({head_ops / full_ops:.1%})"
    )
    reached = f"the fast path reaches {measured / attainable:.0%} of it" if attainable > 0 else ""
    print(
        f"attainable with this floor (the tail skipped for every exiting sample at no cost): "
        f"{attainable:.1%} saved -> {attainable / predicted:.0%} of the predicted gain; {reached}"
    )
    # the trunk's share alone: even an exit head no dearer than its operation count and a
    # fast path with no work of its own could not save more than this
    ceiling = ratio * (1.0 - trunk_share) - head_ops / full_ops
    print(
        f"ceiling at this trunk share (exit head at its operation share, no fixed work): "
        f"{ceiling:.1%} saved -> {ceiling / predicted:.0%} of the predicted gain"
    )


if __name__ == "__main__":
    main()
