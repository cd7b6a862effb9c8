"""Mixed precision by sensitivity: per-layer widths on the score–agreement frontier.

Which layers can keep fewer bits, and which need more, is estimated from the network's Fisher
information (HAWQ-style, Dong et al. 2019/2020): to second order, quantising a tensor by Δ moves
the network's predictions by KL ≈ ½ Σᵢ Fᵢ Δᵢ², where Fᵢ is the mean square of the gradient of
the log-probability of a label drawn from the network's own prediction. So one pass of
per-image gradients on held-out training images gives, for every conv and dense layer,

- its kernel's predicted KL at 4, 6 and 8 bits (Δ: the kernel's actual rounding error on that
  width's MSE-clipped grid), and
- its input's predicted KL at 8 bits (Δ² ≈ step²/12 on the calibrated grid) and at 16 (≈ 0).

The MicroNet counter gives each option's cost (the honest score is additive over layers). A
Lagrange multiplier λ trades one against the other: each layer takes the option that minimises
score + λ·KL on its own, and sweeping λ traces the lower convex hull of predicted (score, KL).
Each configuration on the sweep is then *measured*: quantised post-training with the chosen
method and compared with the float32 network on held-out images. The frontier is the measured
configurations no other beats on both score and agreement; for an agreement floor the search
returns the lowest-score configuration whose measured agreement meets it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from micronet_jax.models.fold import fold_batch_norm
from micronet_jax.models.paths import path_name
from micronet_jax.quant.fake import is_layer_call, kernel_path, qmax, scale_key
from micronet_jax.quant.ptq import layer_order, mse_channel_scales
from micronet_jax.quant.widths import BitWidths

WEIGHT_OPTIONS = (4, 6, 8)
ACTIVATION_OPTIONS = (8, 16)


@dataclasses.dataclass
class Fisher:
    """Mean squared log-likelihood gradients: per kernel weight, and per input channel of
    every conv and dense layer (summed over the input's positions)."""

    kernels: dict[str, np.ndarray]
    inputs: dict[str, np.ndarray]
    images: int


@dataclasses.dataclass(frozen=True)
class Option:
    """One layer's widths, with their predicted KL and the score they add (against 8x8)."""

    weights: int
    activations: int
    kl: float
    score: float


@dataclasses.dataclass
class Candidate:
    """A configuration of the sweep: its widths, predicted KL, and what was measured."""

    bits: BitWidths
    multiplier: float
    predicted_kl: float
    score: float
    measured: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Perturbed:
    """Method interceptor: every layer input plus its own zero perturbation, so the gradient
    with respect to the perturbation is the gradient with respect to the input."""

    deltas: dict[str, jax.Array] | None
    shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)

    def __call__(self, next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        if not is_layer_call(context):
            return next_fun(*args, **kwargs)
        path = kernel_path(context.module)
        x = args[0]
        if self.deltas is None:
            self.shapes[path] = x.shape
        else:
            x = x + self.deltas[path]
        return next_fun(x, *args[1:], **kwargs)


def _log_likelihood(model, folded, kernels, deltas, x, key):
    """Σ over heads of log p(y) for y drawn from the float32 network's own prediction."""
    params = _with_kernels(folded["params"], kernels)
    with nn.intercept_methods(_Perturbed(deltas)):
        outputs = model.apply({**folded, "params": params}, x, train=False)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    total = 0.0
    for index, logits in enumerate(o for o in outputs if o is not None):
        log_p = jax.nn.log_softmax(logits)
        label = jax.random.categorical(jax.random.fold_in(key, index), jax.lax.stop_gradient(log_p))
        total += jnp.sum(jnp.take_along_axis(log_p, label[:, None], axis=-1))
    return total


def _with_kernels(params: dict, kernels: dict[str, jax.Array]) -> dict:
    def replace(path, leaf):
        return kernels.get(path_name(path), leaf)

    return jax.tree_util.tree_map_with_path(replace, params)


@functools.partial(jax.jit, static_argnums=(0,))
def _squared_gradients(model, folded, kernels, deltas, images, key):
    """Σ over the images of each per-image gradient squared (kernels; inputs per channel)."""

    def one(x, k):
        return jax.grad(_log_likelihood, argnums=(2, 3))(model, folded, kernels, deltas, x[None], k)

    keys = jax.random.split(key, images.shape[0])
    g_kernels, g_inputs = jax.vmap(one)(images, keys)
    kernel_sums = {p: jnp.sum(jnp.square(g), axis=0) for p, g in g_kernels.items()}
    input_sums = {
        p: jnp.sum(jnp.square(g), axis=tuple(range(g.ndim - 1))) for p, g in g_inputs.items()
    }
    return kernel_sums, input_sums


def fisher(
    model: nn.Module,
    variables: dict,
    images: np.ndarray,
    prepare: Callable[[jax.Array], jax.Array] | None = None,
    chunk: int = 8,
    seed: int = 0,
) -> Fisher:
    """The Fisher information of every kernel weight and every layer input channel of the
    BN-folded network, estimated on uint8 `images` (held-out training images)."""
    if prepare is None:
        from micronet_jax.data.augment import eval_transform as prepare
    folded = fold_batch_norm(variables)
    probe = _Perturbed(None)
    with nn.intercept_methods(probe):
        jax.eval_shape(
            lambda v: model.apply(v, jnp.zeros((1, *images.shape[1:]), jnp.float32), train=False),
            folded,
        )
    order = layer_order(model, folded, (1, *images.shape[1:]))
    flat = _flat_params(folded["params"])
    kernels = {p: jnp.asarray(flat[p]) for p in order}
    deltas = {p: jnp.zeros((1, *probe.shapes[p][1:]), jnp.float32) for p in order}
    sums_k = {p: np.zeros(kernels[p].shape, np.float64) for p in order}
    sums_x = {p: np.zeros(probe.shapes[p][-1], np.float64) for p in order}
    usable = len(images) - len(images) % chunk or len(images)
    for start in range(0, usable, chunk):
        batch = prepare(jnp.asarray(images[start : start + chunk]))
        key = jax.random.fold_in(jax.random.PRNGKey(seed), start)
        g_k, g_x = _squared_gradients(model, folded, kernels, deltas, batch, key)
        for p in order:
            sums_k[p] += np.asarray(g_k[p])
            sums_x[p] += np.asarray(g_x[p])
    return Fisher(
        {p: v / usable for p, v in sums_k.items()},
        {p: v / usable for p, v in sums_x.items()},
        usable,
    )


def _flat_params(params: dict) -> dict[str, np.ndarray]:
    return {path_name(path): v for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def predicted_kl(
    fisher_info: Fisher,
    folded_params: dict[str, np.ndarray],
    ranges: dict[str, Any],
    path: str,
    weight_bits: int,
    activation_bits: int,
    scale_bits: int = 16,
) -> float:
    """½ Σ F Δ² of the layer at `path` with its kernel at `weight_bits` (MSE-clipped grid,
    rounded to nearest, pruned weights kept at 0) and its input at `activation_bits`
    (`ranges`: the calibrated 8-bit (low, high) of every input, by scale key)."""
    kernel = jnp.asarray(folded_params[path])
    scales = mse_channel_scales(kernel, weight_bits, scale_bits)
    q = qmax(weight_bits)
    codes = jnp.clip(jnp.round(kernel / scales), -q, q)
    error = np.asarray(kernel - codes * scales * (kernel != 0))
    kl = 0.5 * float(np.sum(fisher_info.kernels[path] * error.astype(np.float64) ** 2))
    if activation_bits < 16 and scale_key(path) in ranges:
        low, high = np.asarray(ranges[scale_key(path)], np.float64)
        step = (high - low) / (2**activation_bits - 1)
        kl += 0.5 * float(np.sum(fisher_info.inputs[path] * step**2 / 12.0))
    return kl


def option_table(
    fisher_info: Fisher,
    params: dict,
    ranges: dict[str, Any],
    base: BitWidths,
    score: Callable[[BitWidths], float],
    weights: Sequence[int] = WEIGHT_OPTIONS,
    activations: Sequence[int] = ACTIVATION_OPTIONS,
) -> dict[str, list[Option]]:
    """Every layer's options: predicted KL and what each adds to `score(base)` (the honest
    MicroNet score: `scoring.counter`, given by the caller). Overrides name a layer by its
    whole kernel path, so no prefix reaches another layer."""
    base_score = score(base)
    flat = {k: np.asarray(v) for k, v in _flat_params(params).items()}
    table = {}
    for path in fisher_info.kernels:
        options = []
        for w in weights:
            for a in activations:
                bits = dataclasses.replace(base, overrides=(*base.overrides, (path, w, a)))
                kl = predicted_kl(fisher_info, flat, ranges, path, w, a, base.scale_bits)
                options.append(Option(w, a, kl, score(bits) - base_score))
        table[path] = options
    return table


def allocate(table: dict[str, list[Option]], base: BitWidths, multiplier: float) -> Candidate:
    """Each layer's option minimising score + multiplier·KL: one point of the sweep."""
    overrides, kl, score = [], 0.0, 0.0
    for path, options in table.items():
        best = min(options, key=lambda o: o.score + multiplier * o.kl)
        kl, score = kl + best.kl, score + best.score
        if (best.weights, best.activations) != (base.weights, base.activations):
            overrides.append((path, best.weights, best.activations))
    bits = dataclasses.replace(base, overrides=tuple(overrides))
    return Candidate(bits, multiplier, kl, score)


def multipliers(table: dict[str, list[Option]], count: int = 16) -> list[float]:
    """Multipliers that reach the sweep's configurations: 0 (every layer at its cheapest),
    and quantiles of the rates at which one of a layer's options overtakes another (the
    points where some layer's choice changes), up to past the largest."""
    rates = [
        (b.score - a.score) / (a.kl - b.kl)
        for options in table.values()
        for a in options
        for b in options
        if a.kl > b.kl and a.score < b.score
    ]
    if not rates:
        return [0.0]
    inner = np.quantile(np.asarray(rates), np.linspace(0.0, 1.0, count))
    return [0.0, *(float(r) * 1.0001 for r in inner)]


def sweep(
    table: dict[str, list[Option]], base: BitWidths, multipliers: Sequence[float]
) -> list[Candidate]:
    """The distinct configurations the multipliers choose, from the cheapest."""
    seen, out = set(), []
    for multiplier in sorted(multipliers):
        candidate = allocate(table, base, multiplier)
        if candidate.bits.overrides not in seen:
            seen.add(candidate.bits.overrides)
            out.append(candidate)
    return out


def pareto_frontier(
    candidates: Sequence[Candidate], key: str = "main_agreement"
) -> list[Candidate]:
    """The measured candidates no other beats on both score (lower) and `key` (higher)."""
    ordered = sorted(candidates, key=lambda c: (c.measured["score"], -c.measured[key]))
    out, best = [], -np.inf
    for candidate in ordered:
        if candidate.measured[key] > best:
            out.append(candidate)
            best = candidate.measured[key]
    return out


def lowest_score_meeting(
    candidates: Sequence[Candidate], floor: float, key: str = "main_agreement"
) -> Candidate | None:
    """The measured candidate with the lowest score whose `key` is at least `floor`."""
    meeting = [c for c in candidates if c.measured[key] >= floor]
    return min(meeting, key=lambda c: c.measured["score"]) if meeting else None


def search(
    candidates: Sequence[Candidate],
    measure: Callable[[BitWidths], dict[str, float]],
    floor: float,
    key: str = "main_agreement",
) -> tuple[Candidate | None, list[Candidate]]:
    """Measure every candidate (`measure(bits)` -> {"score": …, key: …, …}); the lowest-score
    one meeting `floor`, and all of them measured."""
    for candidate in candidates:
        if not candidate.measured:
            candidate.measured = dict(measure(candidate.bits))
    return lowest_score_meeting(candidates, floor, key), list(candidates)
