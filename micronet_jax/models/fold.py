"""Batch norm folded into the conv before it: the form a deployed (and quantised) network has.

At inference a BN is y = γ·(x − μ)/√(σ² + ε) + β, an affine map per channel. Folded, the conv
kernel is scaled by a = γ/√(σ² + ε) per output channel and the BN becomes a bias β − μ·a
(the challenge's "BN counted as a bias"). The folded variables run in the same MicroNet: its BN
layers are left with scale 1, mean 0 and variance 1 − ε, so they only add that bias. A pruned
weight stays exactly zero.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

EPSILON = 1e-5

# (conv, the BN after it) in each kind of module scope
_TOP = (("stem_conv", "stem_bn"), ("head_conv", "head_bn"))
_BLOCK = (("expand_conv", "bn0"), ("depthwise_conv", "bn1"), ("project_conv", "bn2"))
_EXIT = (("depthwise_conv", "bn0"), ("expand_conv", "bn1"))


def _pairs(params: dict) -> list[tuple[tuple[str, ...], str, str]]:
    """(scope, conv name, BN name) of every conv followed by a BN in the parameter tree."""
    found = [((), conv, bn) for conv, bn in _TOP if conv in params]
    for name in params:
        pairs = _BLOCK if name.startswith("blocks_") else _EXIT if name == "exit_head" else ()
        found += [((name,), conv, bn) for conv, bn in pairs if conv in params[name]]
    return found


def _scope(tree: dict, scope: tuple[str, ...]) -> dict:
    for key in scope:
        tree = tree[key]
    return tree


def fold_batch_norm(variables: dict, epsilon: float = EPSILON) -> dict:
    """Variables with every BN's running statistics and affine folded into its conv."""
    params = jax.tree_util.tree_map(lambda x: x, variables["params"])  # a copy to write into
    stats = jax.tree_util.tree_map(lambda x: x, variables["batch_stats"])
    for scope, conv_name, bn_name in _pairs(params):
        p_scope, s_scope = _scope(params, scope), _scope(stats, scope)
        bn, running = dict(p_scope[bn_name]), dict(s_scope[bn_name])
        a = bn["scale"] * jax.lax.rsqrt(running["var"] + epsilon)
        conv = dict(p_scope[conv_name])
        conv["kernel"] = conv["kernel"] * a
        p_scope[conv_name] = conv
        p_scope[bn_name] = {"scale": jnp.ones_like(a), "bias": bn["bias"] - running["mean"] * a}
        s_scope[bn_name] = {
            "mean": jnp.zeros_like(a),
            "var": jnp.full_like(a, 1.0 - epsilon),
        }
    return {**variables, "params": params, "batch_stats": stats}


def folded_pairs(params: Any) -> int:
    """How many BN layers `fold_batch_norm` folds in this tree."""
    return len(_pairs(params))


def bias_after(params: dict, kernel_path: str) -> tuple[str, ...]:
    """The key path of the bias a conv or dense layer's output gets next: its own, or the BN
    after it (once folded, a BN is that conv's bias)."""
    *scope, layer, _ = kernel_path.split("/")
    if "bias" in _scope(params, (*scope, layer)):
        return (*scope, layer, "bias")
    for pair_scope, conv, bn in _pairs(params):
        if pair_scope == tuple(scope) and conv == layer:
            return (*scope, bn, "bias")
    raise KeyError(f"no bias or BN after {kernel_path}")
