"""One full-size training step, JAX vs PyTorch eager, timed alternately in one process.

    python -m benchmarks.train_step [--batch 128] [--impl auto|fast|xla] [--steps 10] [--device]

The step is forward + backward + SGD update with ghost BN, SE, drop-connect, dropout and the
mixup label-smoothed loss; data loading and augmentation are left out (inputs are fixed
normalised random images). JAX and torch steps alternate so that noise from other processes
on a shared machine hits both alike; medians and their ratio are reported.

Memory: each framework runs in its own child process (peak RSS is per process and never
goes down). The child records RSS after building model and state, then samples RSS every
millisecond from a thread while it runs warm-up and timed steps; "peak" is the largest sample
minus that baseline, i.e. everything one step needs beyond the weights: activations,
gradients, allocator caches, and for JAX the compiled executable. For JAX the exact XLA
buffer plan (`memory_analysis()`: temporaries + arguments + outputs) is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

from micronet_jax import build_architecture, default_config
from micronet_jax.errors import CommandParser

RECIPE = default_config()  # the recipe's values, not retyped


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Largest RSS seen between start() and stop(), sampled every millisecond."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss_bytes())


def fake_batch(batch: int, num_classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 32, 32, 3)).astype(np.float32)
    la = rng.integers(0, num_classes, batch).astype(np.int32)
    lb = rng.integers(0, num_classes, batch).astype(np.int32)
    return x, la, lb, np.float32(0.7)


class JaxStep:
    """The jitted JAX step (donated state) and its inputs, ready to call."""

    def __init__(self, batch: int, impl: str, dtype: str = "float32", device: bool = False):
        import jax
        import jax.numpy as jnp

        from micronet_jax import MicroNet, create_train_state, init_variables, make_optimizer
        from micronet_jax.config.builders import DTYPES

        if not device:
            jax.config.update("jax_platforms", "cpu")
        arch = build_architecture()
        model = MicroNet(arch=arch, dtype=DTYPES[dtype], conv_impl=impl)
        variables = init_variables(model, jax.random.key(0))
        tx = make_optimizer(RECIPE.train.lr, RECIPE.train.epochs, 391)
        self.state = create_train_state(model.apply, variables, tx, seed=0)
        x, la, lb, lam = fake_batch(batch, arch.num_classes)
        self.inputs = tuple(jax.device_put(a) for a in (x, la, lb, jnp.asarray(lam)))
        self.jitted = jax.jit(make_train_step_without_augmentation(), donate_argnums=(0,))
        self.compile_seconds = 0.0
        self.memory = {}

    def compile(self) -> None:
        tic = time.perf_counter()
        compiled = self.jitted.lower(self.state, *self.inputs).compile()
        self.compile_seconds = time.perf_counter() - tic
        m = compiled.memory_analysis()
        if m is not None:
            self.memory = {
                "temp": m.temp_size_in_bytes,
                "args": m.argument_size_in_bytes,
                "out": m.output_size_in_bytes,
            }
        self.compiled = compiled

    def __call__(self) -> None:
        self.state, loss = self.compiled(self.state, *self.inputs)
        loss.block_until_ready()


def make_train_step_without_augmentation():
    """train_step without augmentation: forward, mixup loss, backward, SGD, re-mask."""
    import jax

    from micronet_jax import apply_masks
    from micronet_jax.train.losses import mixup_loss
    from micronet_jax.train.state import STEP_STREAM, stream_key

    def step(state, x, labels_a, labels_b, lam):
        key = stream_key(state.rng, STEP_STREAM, state.step)

        def loss_fn(params):
            (logits, _), updates = state.apply_fn(
                {"params": params, "batch_stats": state.batch_stats},
                x,
                train=True,
                rngs={"dropout": key},
                mutable=["batch_stats"],
            )
            return mixup_loss(logits, labels_a, labels_b, lam, 0.3), updates["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state = state.apply_gradients(grads=grads, batch_stats=stats)
        return state.replace(params=apply_masks(state.params, state.masks)), loss

    return step


class TorchStep:
    """The eager PyTorch step and its inputs."""

    def __init__(self, batch: int, device: bool = False):
        import torch

        from benchmarks import torch_micronet as tm

        self.torch = torch
        self.dev = "cuda" if device and torch.cuda.is_available() else "cpu"
        arch = build_architecture()
        torch.manual_seed(0)
        self.model = tm.TorchMicroNet(arch).to(self.dev).train()
        self.opt = tm.make_optimizer(self.model)
        x, la, lb, lam = fake_batch(batch, arch.num_classes)
        self.x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(self.dev)
        self.la = torch.from_numpy(la).long().to(self.dev)
        self.lb = torch.from_numpy(lb).long().to(self.dev)
        self.lam = float(lam)
        self.step_fn = tm.train_step

    def __call__(self) -> None:
        loss = self.step_fn(self.model, self.opt, self.x, self.la, self.lb, self.lam)
        if self.dev == "cuda":
            self.torch.cuda.synchronize()
        float(loss)


def timed(fn) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def memory_child(args) -> None:
    """Run one framework alone and print its step memory as JSON (see module docstring)."""
    if args.memory_child == "jax":
        runner = JaxStep(args.batch, args.impl, args.dtype, args.device)
    else:
        runner = TorchStep(args.batch, args.device)
    base = rss_bytes()
    sampler = RssSampler().start()
    if args.memory_child == "jax":
        runner.compile()
    for _ in range(4):
        runner()
    peak = sampler.stop()
    steady = rss_bytes()
    out = {"peak_mb": (peak - base) / 2**20, "steady_mb": (steady - base) / 2**20}
    if args.memory_child == "jax":
        out["xla_plan_mb"] = sum(runner.memory.values()) / 2**20
        out["xla_temp_mb"] = runner.memory.get("temp", 0) / 2**20
    print(json.dumps(out))


def measure_memory(args, which: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--memory_child", which]
    cmd += ["--batch", str(args.batch), "--impl", args.impl, "--dtype", args.dtype]
    cmd += ["--device"] if args.device else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = CommandParser(prog="python -m benchmarks.train_step", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--impl", default="auto", choices=("auto", "fast", "xla"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", action="store_true", help="use the default accelerator")
    p.add_argument("--no_memory", action="store_true")
    p.add_argument("--memory_child", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        return memory_child(args)

    import jax
    import torch

    jax_step = JaxStep(args.batch, args.impl, args.dtype, args.device)
    torch_step = TorchStep(args.batch, args.device)
    jax_step.compile()
    for _ in range(args.warmup):
        jax_step()
        torch_step()
    jt, tt = [], []
    for _ in range(args.steps):
        jt.append(timed(jax_step))
        tt.append(timed(torch_step))
    j, t = statistics.median(jt), statistics.median(tt)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, impl={args.impl}, "
        f"torch {torch.__version__} on {torch_step.dev} ({torch.get_num_threads()} threads), "
        f"batch {args.batch}, {args.dtype}, {args.steps} alternating steps"
    )
    print(f"JAX compile: {jax_step.compile_seconds:.1f} s")
    print(
        f"JAX   step median {j * 1e3:8.1f} ms  {args.batch / j:7.1f} images/s  "
        f"(min {min(jt) * 1e3:.1f}, max {max(jt) * 1e3:.1f})"
    )
    print(
        f"torch step median {t * 1e3:8.1f} ms  {args.batch / t:7.1f} images/s  "
        f"(min {min(tt) * 1e3:.1f}, max {max(tt) * 1e3:.1f})"
    )
    print(f"JAX/torch throughput ratio: {t / j:.2f}x")
    if not args.no_memory:
        mj, mt = measure_memory(args, "jax"), measure_memory(args, "torch")
        print(
            f"JAX   peak RSS growth {mj['peak_mb']:7.0f} MB (steady {mj['steady_mb']:.0f} MB; "
            f"XLA buffer plan {mj['xla_plan_mb']:.0f} MB, temporaries {mj['xla_temp_mb']:.0f} MB)"
        )
        print(f"torch peak RSS growth {mt['peak_mb']:7.0f} MB (steady {mt['steady_mb']:.0f} MB)")
        print(f"JAX/torch peak memory ratio: {mj['peak_mb'] / mt['peak_mb']:.2f}x")


if __name__ == "__main__":
    main()
