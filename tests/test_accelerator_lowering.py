"""Every program a run compiles lowers for GPU and TPU, from this CPU-only host.

Each program is traced under `runtime.lowering_for(platform)`, so that every choice made
while tracing (the convolution lowering, CPU micro-batches) is the one `auto` makes on that
platform, and exported with `jax.export(..., platforms=(platform,))`. The exported module
must hold no custom calls (a kernel XLA would not have for the target) and no host
callbacks, and its convolutions must be XLA's own: one `stablehlo.convolution` per conv
kernel of the model in inference, none of the CPU's shifted multiply-adds.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from micronet_jax.backend import lowering_for, target_platform
from micronet_jax.evaluation.early_exit import fast_exit_batch
from micronet_jax.models.architecture import build_architecture
from micronet_jax.models.efficientnet import MicroNet, init_variables
from micronet_jax.train import loop
from micronet_jax.train.guard import GuardedStep
from micronet_jax.train.optim import make_optimizer
from micronet_jax.train.state import create_exit_state, create_train_state
from micronet_jax.train.steps import StepConfig, exit_train_step, predict_step, train_step

ROOT = Path(__file__).resolve().parents[1]
TINY = (
    "r1_k3_s1_e1_i8_o8_se0.25",
    "r1_k3_s2_e2_i8_o16_se0.25",
    "r1_k3_s1_e2_i16_o16_se0.25",
)
# Sharding annotations are XLA's own bookkeeping, lowered as custom calls by name only.
ANNOTATIONS = {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"}


def architecture(size: str):
    if size == "tiny":
        arch = build_architecture(TINY, width=1.0, resolution=1.0, head_filters=32, num_classes=10)
        return arch.with_exit_head(1)
    return build_architecture().with_exit_head(4)


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def conv_kernels(params) -> int:
    """Every 4-D kernel is one convolution of the forward pass."""
    return sum(1 for leaf in jax.tree.leaves(params) if len(leaf.shape) == 4)


def programs(size: str, dtype) -> dict[str, tuple]:
    """name -> (jitted function, abstract arguments, expected convolutions) of every program
    a run compiles. Inference programs hold exactly one convolution per kernel; training
    programs at least the forward ones plus the input gradients they need."""
    arch, batch = architecture(size), (32 if size == "tiny" else 128)
    main, with_exit = MicroNet(arch.with_exit_head(None), dtype=dtype), MicroNet(arch, dtype=dtype)
    variables = jax.eval_shape(functools.partial(init_variables, with_exit), jax.random.key(0))
    main_vars = {k: {n: v for n, v in t.items() if n != "exit_head"} for k, t in variables.items()}
    tx = make_optimizer(0.13, 2, 10)
    state = jax.eval_shape(lambda v: create_train_state(main.apply, v, tx, 0), main_vars)
    exit_state = jax.eval_shape(lambda v: create_exit_state(with_exit.apply, v, tx, 0), variables)
    images = jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.uint8)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    one_batch = {"image": images, "label": labels}
    key = jax.eval_shape(lambda: jax.random.key(0))
    n = 8 * batch  # the data set on the device, from which the K-step program gathers
    data = (
        images.update(shape=(n, 32, 32, 3)),
        labels.update(shape=(n,)),
        labels.update(shape=(n,)),
    )
    start = jax.ShapeDtypeStruct((), jnp.int32)
    threshold = jax.ShapeDtypeStruct((), jnp.float32)
    main_convs = conv_kernels(main_vars["params"])
    all_convs = conv_kernels(variables["params"])
    train = functools.partial(train_step, cfg=StepConfig())
    exit_cfg = StepConfig(mixup_alpha=0.0, loss="soft_smoothing")
    k_steps = functools.partial(
        loop.run_steps, step_fn=GuardedStep(train), batch_size=batch, steps=4
    )
    predict = jax.jit(predict_step, static_argnums=0)
    return {
        "train_step": (jax.jit(train), (state, one_batch, key), (">=", 2 * main_convs - 1)),
        "exit_train_step": (
            jax.jit(functools.partial(exit_train_step, cfg=exit_cfg)),
            (exit_state, one_batch, key),
            (">=", all_convs),
        ),
        "k_steps": (jax.jit(k_steps), (state, *data, start), (">=", 2 * main_convs - 1)),
        "predict": (predict, (main.apply, main_vars, images), ("==", main_convs)),
        "exact_exit": (predict, (with_exit.apply, variables, images), ("==", all_convs)),
        "fast_exit": (
            jax.jit(functools.partial(fast_exit_batch, with_exit, chunk=batch // 8)),
            (variables, images, threshold),
            ("==", all_convs),
        ),
    }


def export_text(fn, args, platform: str) -> str:
    return jax.export.export(fn, platforms=(platform,))(*args).mlir_module()


def check_module(name: str, text: str, expected: tuple[str, int]) -> int:
    calls = set(re.findall(r"custom_call @([\w.]+)", text)) - ANNOTATIONS
    assert not calls, f"{name}: custom calls {calls}"
    assert "callback" not in text.lower(), f"{name}: a host callback"
    convolutions = text.count("stablehlo.convolution")
    how, count = expected
    assert convolutions == count if how == "==" else convolutions >= count, (name, convolutions)
    return convolutions


def lower_all(size: str, dtype, platform: str, names=None) -> dict[str, int]:
    """Export the programs for `platform`; their convolution counts."""
    counts = {}
    with lowering_for(platform):
        assert target_platform() == platform
        for name, (fn, args, expected) in programs(size, dtype).items():
            if names is None or name in names:
                counts[name] = check_module(name, export_text(fn, args, platform), expected)
    return counts


@pytest.mark.slow
def test_train_step_and_predict_lower_for_cuda():
    counts = lower_all("tiny", jnp.float32, "cuda", names=("train_step", "predict"))
    assert counts["predict"] == 16  # 3 blocks (4 + 5 + 5 convs), stem, head: all XLA's


def test_the_check_sees_the_cpu_lowering():
    """Traced for a CPU, the same program has no convolution op at all (shifted sums and
    matmuls), so the counts above really tell the two apart."""
    with lowering_for("cpu"):
        fn, args, _ = programs("tiny", jnp.float32)["predict"]
        assert export_text(fn, args, "cpu").count("stablehlo.convolution") == 0
    assert target_platform() == jax.default_backend()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_every_program_lowers(platform, dtype):
    counts = lower_all("tiny", dtype, platform)
    assert set(counts) == {
        "train_step", "exit_train_step", "k_steps", "predict", "exact_exit", "fast_exit",
    }  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("platform, dtype", [("cuda", jnp.bfloat16), ("tpu", jnp.float32)])
def test_the_full_models_programs_lower(platform, dtype):
    counts = lower_all("full", dtype, platform, names=("train_step", "predict", "fast_exit"))
    arch = build_architecture()
    per_block = [int(b.has_expand) + 1 + 2 * bool(b.se_filters) + 1 for b in arch.blocks]
    assert counts["predict"] == 1 + sum(per_block) + 1 == 51  # stem, blocks, head


SHARDED = textwrap.dedent(
    r"""
    import functools, json, re, sys
    import jax, jax.numpy as jnp
    sys.path.insert(0, {tests!r})
    from test_accelerator_lowering import architecture
    from micronet_jax.models.efficientnet import MicroNet, init_variables
    from micronet_jax.backend import lowering_for
    from micronet_jax.distributed import sharding
    from micronet_jax.train.optim import make_optimizer
    from micronet_jax.train.state import create_train_state
    from micronet_jax.train.steps import StepConfig, train_step

    assert jax.device_count() == 8
    mesh = sharding.make_mesh()
    with lowering_for("tpu"):
        model = MicroNet(architecture({size!r}).with_exit_head(None))
        variables = jax.eval_shape(functools.partial(init_variables, model), jax.random.key(0))
        tx = make_optimizer(0.13, 2, 10)
        state = jax.eval_shape(lambda v: create_train_state(model.apply, v, tx, 0), variables)
        batch = {{"image": jax.ShapeDtypeStruct((128, 32, 32, 3), jnp.uint8),
                  "label": jax.ShapeDtypeStruct((128,), jnp.int32)}}
        key = jax.eval_shape(lambda: jax.random.key(0))
        replicated, split = sharding.replicated(mesh), sharding.batch_sharding(mesh)
        step = jax.jit(
            functools.partial(train_step, cfg=StepConfig()),
            in_shardings=(replicated, split, replicated),
            out_shardings=(replicated, replicated),
        )
        exported = jax.export.export(step, platforms=("tpu",))(state, batch, key)
    text = exported.mlir_module()
    spec = r"{{sdy.sharding = #sdy.sharding<@mesh, (\[[^>]*\])>}}"
    args = re.findall(r"%arg\d+: tensor<[^>]*> " + spec + r' loc\("([^"]+)"\)', text)
    print(json.dumps(dict(
        devices=exported.nr_devices,
        mesh=re.findall(r"sdy.mesh @mesh = <([^>]*)>", text),
        state=sorted({{spec for spec, name in args if name.startswith("state.")}}),
        batch={{name: spec for spec, name in args if name.startswith("batch")}},
        convolutions=text.count("stablehlo.convolution"),
    )))
    """
)


@pytest.mark.slow
def test_data_parallel_step_lowers_for_an_8_device_tpu_mesh():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    code = SHARDED.format(tests=str(ROOT / "tests"), size="tiny")
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8 and out["mesh"] == ['["data"=8]']
    # every state leaf (params, optimizer, BN statistics, masks) unsplit on every axis
    assert out["state"] and all("data" not in spec for spec in out["state"]), out["state"]
    assert out["batch"] == {
        "batch['image']": '[{"data"}, {}, {}, {}]',
        "batch['label']": '[{"data"}]',
    }
    assert out["convolutions"] > 0


def test_lowering_for_rejects_unknown_platforms():
    from micronet_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="platform"), lowering_for("mps"):
        pass
