"""A toy linear model driven through `fit`: fit's behaviour does not depend on the network,
and the toy compiles in a second. Shared by the reliability tests, in-process, and by the
K-steps-per-dispatch comparisons, which run it in a child compiled with XLA's default flags
(`python tests/toy_run.py OUT`; see `tiny_run.user_env`)."""

from __future__ import annotations

import os
import pickle
import signal
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tiny_run import stable

from micronet_jax.train import loop
from micronet_jax.train.checkpoint import Checkpointer
from micronet_jax.train.guard import Interrupted
from micronet_jax.train.progress import StageBar
from micronet_jax.train.state import create_train_state

EPOCHS, BATCH, N = 4, 8, 40  # 5 steps per epoch
K_CASES = [(N, 4), (N + 4, 2)]  # (examples, K): 5 steps of 8; 5 of 8 and one of 4


def toy_step(state, batch, key):
    """Softmax regression on the raw pixels, with a little noise from the step key."""
    x = batch["image"].reshape(batch["image"].shape[0], -1).astype(jnp.float32) / 255.0
    x = x + 0.01 * jax.random.normal(key, x.shape)

    def loss_fn(params):
        logits = x @ params["w"] + params["b"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return state, {"loss": loss, "accuracy": accuracy}


def toy_data(n: int = N) -> loop.DeviceData:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    return loop.DeviceData.from_numpy(images, rng.integers(0, 10, n))


def toy_state():
    variables = {"params": {"w": jnp.zeros((48, 10)), "b": jnp.zeros(10)}}
    return create_train_state(None, variables, optax.sgd(0.5, momentum=0.9), seed=3)


def toy_fit(workdir: Path, n: int = N, **kwargs):
    schedule = loop.Schedule(
        epochs=EPOCHS, batch_size=BATCH, num_examples=n, batch_multiple=1, eval_every=1,
        checkpoint_every=1,
    )  # fmt: skip
    kwargs.setdefault("keep_checkpoints", 10)
    kwargs.setdefault("progress", False)
    return loop.fit(
        toy_state(), toy_step, toy_data(n), schedule, workdir, loop.FitOptions(**kwargs)
    )


def params_of(state) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


class SignalAt(StageBar):
    """A silent progress bar that sends `signum` to this process once `count` steps ran."""

    def __init__(self, count: int, signum: int):
        super().__init__("train", total=EPOCHS * 5, enabled=False, quiet=True)
        self.count, self.signum = count, signum

    def advance(self, steps: int, images: int) -> None:
        before = self.done
        super().advance(steps, images)
        if before < self.count <= self.done:
            os.kill(os.getpid(), self.signum)


def _outcome(state, records) -> dict:
    return {"step": int(state.step), "params": params_of(state), "records": stable(records)}


def k_step_runs() -> dict:
    """The runs the K-steps-per-dispatch tests compare: for each of `K_CASES`, the toy at
    one step per dispatch, (n, 1), and at K, (n, k); and "signal": a run at K = 4 that
    receives SIGTERM after step 7 (inside epoch 2's group of steps 5-8), with the checkpoint
    it left and the outcome of resuming it at K = 4."""
    runs: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n, k in K_CASES:
            for per_dispatch in (1, k):
                workdir = Path(tmp) / f"{n}-{per_dispatch}"
                runs[n, per_dispatch] = _outcome(
                    *toy_fit(workdir, n=n, steps_per_dispatch=per_dispatch)
                )
        workdir = Path(tmp) / "signal"
        try:
            toy_fit(workdir, steps_per_dispatch=4, progress=SignalAt(7, signal.SIGTERM))
            exit_code = None
        except Interrupted as stopped:
            exit_code = stopped.exit_code
        ckpt = Checkpointer(workdir / "checkpoints")
        latest = ckpt.latest_step()
        ckpt.close()
        resumed = _outcome(*toy_fit(workdir, steps_per_dispatch=4))
        runs["signal"] = {"exit_code": exit_code, "latest_step": latest, **resumed}
    return runs


if __name__ == "__main__":
    Path(sys.argv[1]).write_bytes(pickle.dumps(k_step_runs()))
