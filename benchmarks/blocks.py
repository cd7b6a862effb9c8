"""Forward + backward of each MBConv block alone, JAX vs PyTorch eager, batch 128.

    python -m benchmarks.blocks [BLOCK ...] [--batch 128] [--repeats 7]

Shows where the full train step's time goes, block by block: each block of the full-size
network on random input of its own shape, loss = Σ y², gradients for parameters and input
(ghost BN in training mode, drop-connect on). JAX and torch alternate; medians are reported,
with the size of XLA's temporaries for each block.
"""

from __future__ import annotations

import statistics

import numpy as np

from benchmarks.train_step import timed
from micronet_jax import build_architecture
from micronet_jax.errors import CommandParser
from micronet_jax.models.architecture import conv_padding


def main() -> None:
    parser = CommandParser(prog="python -m benchmarks.blocks", description=__doc__.splitlines()[0])
    parser.add_argument("blocks", type=int, nargs="*", help="block indices (default: all)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import torch

    from benchmarks import torch_micronet as tm
    from micronet_jax.models.efficientnet import MBConv

    jax.config.update("jax_platforms", "cpu")
    arch = build_architecture()
    total_jax = total_torch = 0.0
    for index in args.blocks or range(len(arch.blocks)):
        spec = arch.blocks[index]
        padding = conv_padding(arch, spec.kernel_size, spec.stride)
        shape = (args.batch, spec.input_size, spec.input_size, spec.input_filters)
        x = jnp.asarray(np.random.default_rng(0).standard_normal(shape, np.float32))
        block = MBConv(spec, padding)
        variables = block.init({"params": jax.random.key(0)}, x, False)

        def loss(params, stats, x, block=block):
            y, updates = block.apply(
                {"params": params, "batch_stats": stats},
                x,
                True,
                rngs={"dropout": jax.random.key(1)},
                mutable=["batch_stats"],
            )
            return jnp.sum(y * y), updates

        grad = jax.jit(jax.grad(loss, argnums=(0, 2), has_aux=True))
        compiled = grad.lower(variables["params"], variables["batch_stats"], x).compile()
        temp_mb = compiled.memory_analysis().temp_size_in_bytes / 2**20
        torch_block = tm.MBConv(spec, padding).train()
        xt = torch.randn(args.batch, spec.input_filters, spec.input_size, spec.input_size)
        xt.requires_grad_(True)

        def jax_step(compiled=compiled, variables=variables, x=x):
            jax.block_until_ready(compiled(variables["params"], variables["batch_stats"], x))

        def torch_step(torch_block=torch_block, xt=xt):
            y = torch_block(xt)
            (y * y).sum().backward()

        for _ in range(2):
            jax_step()
            torch_step()
        jax_times, torch_times = [], []
        for _ in range(args.repeats):
            jax_times.append(timed(jax_step))
            torch_times.append(timed(torch_step))
        j, t = statistics.median(jax_times) * 1e3, statistics.median(torch_times) * 1e3
        total_jax, total_torch = total_jax + j, total_torch + t
        print(
            f"block {index} {spec.input_size}->{spec.output_size} px, {spec.mid_filters:3d} "
            f"channels: JAX {j:7.1f} ms  torch {t:7.1f} ms  torch/JAX {t / j:.2f}  "
            f"XLA temporaries {temp_mb:.0f} MB"
        )
    print(
        f"sum: JAX {total_jax:.0f} ms  torch {total_torch:.0f} ms  "
        f"torch/JAX {total_torch / total_jax:.2f}"
    )


if __name__ == "__main__":
    main()
