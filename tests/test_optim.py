"""The optimizer against PyTorch SGD semantics: coupled decay, momentum, cosine/epoch."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from micronet_jax.models.architecture import build_architecture
from micronet_jax.models.efficientnet import create_model, init_variables
from micronet_jax.train.optim import cosine_per_epoch, decay_mask, lr_at_epoch, make_optimizer

BASE_LR = 0.13
EPOCHS = 3
STEPS_PER_EPOCH = 2
STEPS = 8  # runs past the last epoch: the schedule stays at the last epoch's lr (0)


def toy_params() -> dict:
    rng = np.random.default_rng(0)
    return {
        "conv": {
            "kernel": rng.standard_normal((2, 3)).astype(np.float32),
            "bias": rng.standard_normal(3).astype(np.float32),
        },
        "bn": {
            "scale": rng.uniform(0.5, 1.5, 3).astype(np.float32),
            "bias": rng.standard_normal(3).astype(np.float32),
        },
    }


TARGETS = jax.tree_util.tree_map(lambda p: np.full_like(p, 0.5), toy_params())
CURVATURE = {"conv": {"kernel": 1.0, "bias": 2.0}, "bn": {"scale": 0.5, "bias": 3.0}}


def toy_loss(params):
    """Σ c/2·(p − t)²: the gradient depends on the params, so trajectories diverge on error."""
    terms = jax.tree_util.tree_map(
        lambda p, t, c: 0.5 * c * jnp.sum((p - t) ** 2), params, TARGETS, CURVATURE
    )
    return sum(jax.tree_util.tree_leaves(terms))


def numpy_grad(params):
    return {
        layer: {
            name: CURVATURE[layer][name] * (p - TARGETS[layer][name]) for name, p in leaves.items()
        }
        for layer, leaves in params.items()
    }


def hand_lr(step: int) -> float:
    """Epoch e = step // steps_per_epoch + 1 (capped at T): 0.13·(1 + cos(πe/T))/2."""
    epoch = min(step // STEPS_PER_EPOCH + 1, EPOCHS)
    return BASE_LR * (1 + math.cos(math.pi * epoch / EPOCHS)) / 2


def reference_sgd(params, weight_decay, momentum=0.9):
    """PyTorch SGD in numpy (float64): d = g + wd·p (not biases), buf = m·buf + d, p -= lr·buf."""
    params = {k: {n: v.astype(np.float64) for n, v in d.items()} for k, d in params.items()}
    bufs: dict = {}
    history = []
    for step in range(STEPS):
        grads = numpy_grad(params)
        lr = hand_lr(step)
        for layer, leaves in params.items():
            for name, p in leaves.items():
                d = grads[layer][name] + (0.0 if name == "bias" else weight_decay) * p
                key = (layer, name)
                bufs[key] = d if key not in bufs else momentum * bufs[key] + d
                leaves[name] = p - lr * bufs[key]
        history.append({k: dict(v) for k, v in params.items()})
    return history


def run_optax(params, weight_decay):
    """Our optimizer; weight_decay None uses make_optimizer's defaults (recipe: 0.9, 1e-5)."""
    if weight_decay is None:
        tx = make_optimizer(BASE_LR, EPOCHS, STEPS_PER_EPOCH)
    else:
        tx = make_optimizer(
            BASE_LR, EPOCHS, STEPS_PER_EPOCH, momentum=0.9, weight_decay=weight_decay
        )
    params = jax.tree_util.tree_map(jnp.asarray, params)
    state = tx.init(params)
    grad_fn = jax.jit(jax.grad(toy_loss))
    history = []
    for _ in range(STEPS):
        updates, state = tx.update(grad_fn(params), state, params)
        params = optax.apply_updates(params, updates)
        history.append(jax.tree_util.tree_map(np.asarray, params))
    return history


def assert_trees_close(a, b, atol=1e-6, where=""):
    for layer in b:
        for name in b[layer]:
            np.testing.assert_allclose(
                a[layer][name], b[layer][name], rtol=0, atol=atol, err_msg=f"{where} {layer}/{name}"
            )


def test_hand_lr_values():
    """The schedule the references use: 0.0975, 0.0325, 0 for T = 3."""
    assert [hand_lr(s) for s in range(6)] == pytest.approx(
        [0.0975, 0.0975, 0.0325, 0.0325, 0.0, 0.0], abs=1e-12
    )


@pytest.mark.parametrize("weight_decay", [None, 0.05])
def test_make_optimizer_matches_pytorch_sgd_in_numpy(weight_decay):
    """Every step across the epoch boundaries equals hand-written PyTorch SGD to 1e-6."""
    params = toy_params()
    ours = run_optax(params, weight_decay)
    ref = reference_sgd(params, 1e-5 if weight_decay is None else weight_decay)
    for step, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert_trees_close(a, b, where=f"step {step}")
    # Params stop moving in the last epoch only if momentum is scaled by a zero lr.
    assert_trees_close(ours[-1], ours[3])


def test_decay_skips_biases_and_hits_bn_scale():
    """With a large decay, the references differ exactly where the decay mask says."""
    params = toy_params()
    ours = run_optax(params, 0.05)[-1]
    no_decay = reference_sgd(params, 0.0)[-1]
    assert_trees_close(
        {"conv": {"bias": ours["conv"]["bias"]}, "bn": {"bias": ours["bn"]["bias"]}},
        {"conv": {"bias": no_decay["conv"]["bias"]}, "bn": {"bias": no_decay["bn"]["bias"]}},
    )
    assert np.max(np.abs(ours["bn"]["scale"] - no_decay["bn"]["scale"])) > 1e-4
    assert np.max(np.abs(ours["conv"]["kernel"] - no_decay["conv"]["kernel"])) > 1e-4


@pytest.mark.slow
def test_make_optimizer_matches_torch_sgd():
    """torch.optim.SGD with param groups (no decay for biases) and a per-epoch manual lr."""
    torch = pytest.importorskip("torch")
    weight_decay = 0.05
    params = toy_params()
    tparams = {
        (k, n): torch.tensor(v, requires_grad=True) for k, d in params.items() for n, v in d.items()
    }
    groups = [
        {
            "params": [p for (_, n), p in tparams.items() if n != "bias"],
            "weight_decay": weight_decay,
        },
        {"params": [p for (_, n), p in tparams.items() if n == "bias"], "weight_decay": 0.0},
    ]
    opt = torch.optim.SGD(groups, lr=BASE_LR, momentum=0.9)
    ours = run_optax(params, weight_decay)
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = hand_lr(step)
        opt.zero_grad()
        loss = sum(
            0.5 * CURVATURE[k][n] * ((p - float(TARGETS[k][n].flat[0])) ** 2).sum()
            for (k, n), p in tparams.items()
        )
        loss.backward()
        opt.step()
        expected = {k: {n: tparams[(k, n)].detach().numpy() for n in d} for k, d in params.items()}
        assert_trees_close(ours[step], expected, where=f"step {step}")


def test_cosine_per_epoch_values():
    """Epoch e (1-based) runs at base·(1 + cos(πe/T))/2 for all its steps; the last at 0."""
    sched = cosine_per_epoch(0.13, 4, 10)
    expected = {
        0: 0.13 * (1 + math.cos(math.pi / 4)) / 2,  # epoch 1: 0.110962
        9: 0.13 * (1 + math.cos(math.pi / 4)) / 2,
        10: 0.065,  # epoch 2: cos(π/2) = 0
        19: 0.065,
        20: 0.13 * (1 - math.cos(math.pi / 4)) / 2,  # epoch 3: 0.019038
        29: 0.13 * (1 - math.cos(math.pi / 4)) / 2,
        30: 0.0,  # epoch 4 = T
        39: 0.0,
        40: 0.0,  # past the end: stays at the last epoch
        1000: 0.0,
    }
    for step, lr in expected.items():
        assert float(sched(jnp.asarray(step))) == pytest.approx(lr, abs=1e-7), step
    assert float(sched(jnp.asarray(0))) == pytest.approx(0.110962, abs=1e-6)
    for e in range(1, 5):
        assert lr_at_epoch(0.13, 4, e) == pytest.approx(float(sched(jnp.asarray(10 * (e - 1)))))
    for bad in ((0, 10), (4, 0), (-1, 5)):
        with pytest.raises(ValueError):
            cosine_per_epoch(0.13, *bad)


def test_decay_mask():
    """Every leaf named `bias` is excluded, everything else (kernels, BN scales) included."""
    tree = {
        "a": {"kernel": 1, "bias": 2},
        "bn": {"scale": 3, "bias": 4},
        "blocks_0": {"se_reduce": {"kernel": 5, "bias": 6}},
        "fc": {"kernel": 7},
    }
    assert decay_mask(tree) == {
        "a": {"kernel": True, "bias": False},
        "bn": {"scale": True, "bias": False},
        "blocks_0": {"se_reduce": {"kernel": True, "bias": False}},
        "fc": {"kernel": True},
    }


def test_decay_mask_on_model_params():
    """On the real parameter tree: only conv/dense biases and BN shifts escape decay."""
    model = create_model(build_architecture(exit_block=4))
    params = jax.eval_shape(lambda k: init_variables(model, k), jax.random.key(0))["params"]
    mask = decay_mask(params)
    pairs = [(getattr(p[-1], "key", None), m) for p, m in jax.tree_util.tree_leaves_with_path(mask)]
    assert all(m is (name != "bias") for name, m in pairs)
    names = {name for name, _ in pairs}
    assert names == {"kernel", "bias", "scale"}
    # 10 blocks × 3 BN (block 0: 2) + stem/head BN + 2 exit-head BN = 33 scales, all decayed.
    assert sum(1 for name, m in pairs if name == "scale" and m) == 33


def test_cosine_per_step_spends_every_step_of_a_short_stage():
    """The quantize stage's schedule: from the base rate down to 0 over its own steps, so a
    2-epoch stage does not spend its second epoch at 0 (as the recipe's per-epoch one would)."""
    from micronet_jax.train.optim import cosine_per_epoch, cosine_per_step

    per_step = cosine_per_step(0.01, 50)
    assert float(per_step(0)) == pytest.approx(0.01)
    assert float(per_step(25)) == pytest.approx(0.005)
    assert 0 < float(per_step(49)) < 1e-4 and float(per_step(50)) == pytest.approx(0.0)
    assert float(cosine_per_epoch(0.01, 2, 25)(30)) == pytest.approx(0.0)  # the recipe's
