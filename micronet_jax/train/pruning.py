"""Layer-wise normalised global magnitude pruning, as masks shaped like the params.

Each prunable weight (a tensor with more than one dimension) scores |w| / ‖w‖₂ over its own
tensor; one global threshold — numpy's linearly interpolated percentile of *all* scores,
already-pruned zeros included — keeps the weights scoring strictly above it. Normalising by
the tensor's norm lets small layers keep their weights; per-layer sparsities come out unequal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from micronet_jax.errors import ConfigError
from micronet_jax.models.paths import path_name

PathFilter = Callable[[str], bool]

# Cumulative sparsity targets (percent) of the recipe's 11 rounds.
DEFAULT_TARGETS: tuple[float, ...] = (10, 20, 30, 40, 50, 52.5, 55, 57.5, 60, 62, 64)


def is_prunable(path: str, leaf: Any) -> bool:
    """Pruning acts on weight tensors with more than one dimension (convs and dense)."""
    del path
    return np.ndim(leaf) > 1


def main_network(path: str) -> bool:
    """Stage B prunes the main network only."""
    return not path.startswith("exit_head/")


def exit_head(path: str) -> bool:
    """Stage D prunes only the exit head's tensors."""
    return path.startswith("exit_head/")


def validate_targets(targets: Sequence[float]) -> tuple[float, ...]:
    """Cumulative targets must be increasing percentages in [0, 100)."""
    targets = tuple(float(t) for t in targets)
    for t in targets:
        if not 0 <= t < 100:
            raise ConfigError(f"sparsity targets must be percentages in [0, 100), got {t}")
    if any(b <= a for a, b in zip(targets, targets[1:], strict=False)):
        raise ConfigError(f"sparsity targets must increase round by round, got {list(targets)}")
    return targets


def _selected(params: Any, select: PathFilter) -> list[tuple[str, np.ndarray]]:
    leaves = jax.tree_util.tree_leaves_with_path(params)
    chosen = []
    for key_path, leaf in leaves:
        name = path_name(key_path)
        if is_prunable(name, leaf) and select(name):
            chosen.append((name, np.asarray(leaf, dtype=np.float32)))
    return chosen


def scores(weight: np.ndarray) -> np.ndarray:
    """|w| / ‖w‖₂ over the whole tensor (all zeros stay zero)."""
    norm = np.linalg.norm(weight.astype(np.float64))
    magnitude = np.abs(weight.astype(np.float64))
    return magnitude / norm if norm > 0 else magnitude


def global_threshold(params: Any, percent: float, select: PathFilter = main_network) -> float:
    """The `percent`-th percentile (numpy's linear interpolation) of every selected score."""
    chosen = _selected(params, select)
    if not chosen:
        raise ConfigError("no prunable tensors were selected")
    all_scores = np.concatenate([scores(w).ravel() for _, w in chosen])
    return float(np.percentile(all_scores, percent))


def prune_masks(
    params: Any,
    percent: float,
    masks: Any = None,
    select: PathFilter = main_network,
) -> Any:
    """New masks at cumulative sparsity `percent` for the selected tensors.

    Unselected leaves keep their current mask (ones when `masks` is None). Weights are read
    as they are; pass masked params so earlier rounds' zeros enter the percentile.
    """
    validate_targets([percent])
    threshold = global_threshold(params, percent, select)

    def new_mask(key_path, leaf, old):
        name = path_name(key_path)
        if is_prunable(name, leaf) and select(name):
            keep = scores(np.asarray(leaf, dtype=np.float32)) > threshold
            return keep.astype(np.float32)
        return np.ones(np.shape(leaf), np.float32) if old is None else np.asarray(old)

    if masks is None:
        return jax.tree_util.tree_map_with_path(lambda p, leaf: new_mask(p, leaf, None), params)
    return jax.tree_util.tree_map_with_path(new_mask, params, masks)


def sparsity_by_layer(params: Any, select: PathFilter = lambda _: True) -> dict[str, float]:
    """Share of exact zeros in each selected prunable tensor."""
    return {name: float(np.mean(w == 0)) for name, w in _selected(params, select)}


def global_sparsity(params: Any, select: PathFilter = main_network) -> float:
    """Share of exact zeros among all selected prunable weights."""
    chosen = _selected(params, select)
    zeros = sum(int(np.sum(w == 0)) for _, w in chosen)
    total = sum(w.size for _, w in chosen)
    return zeros / total if total else 0.0
