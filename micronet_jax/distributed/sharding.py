"""Data parallelism: one jitted step over a 'data' mesh axis of every device.

The batch is split along its first axis across devices and the state is replicated; XLA
inserts the gradient all-reduce. Ghost BN needs no special care: it groups samples by a
reshape of the *global* batch, so the sharded step computes exactly the single-device math
(the compiler adds whatever communication the reshape and the statistics need).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh over all (global) devices, named 'data'."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Split the leading (batch) axis across the mesh."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _global_array(x: Any, sharding: NamedSharding) -> jax.Array:
    """`x` (the same on every process) as one global array: each process fills only the
    devices it owns, so a multi-host job never moves data between hosts to build it."""
    host = np.asarray(local_copy(x))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every array leaf of `tree` (e.g. the train state) on all devices. A Python number
    (a fresh state's step counter) is placed as an array too: the step returns it as one, and
    a first call given a number would compile the step a second time for the later calls."""
    sharding = replicated(mesh)

    def place(x: Any) -> Any:
        if isinstance(x, int | float):
            x = jax.numpy.asarray(x)
        return _global_array(x, sharding) if isinstance(x, jax.Array | np.ndarray) else x

    return jax.tree_util.tree_map(place, tree)


def local_copy(tree: Any) -> Any:
    """Every array leaf that spans other processes' devices replaced by this process's own
    replica (on one of its devices), so that it can be read, pruned or evaluated here. Only
    for replicated arrays (the train state); leaves already local are returned as they are."""

    def local(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x.addressable_data(0)
        return x

    return jax.tree_util.tree_map(local, tree)


def data_mesh(enabled: bool) -> Mesh | None:
    """A 'data' mesh over all devices when asked for and there is more than one device."""
    if not enabled or jax.device_count() == 1:
        return None
    return make_mesh()


def place_state(state: Any, mesh: Mesh | None) -> Any:
    """The state replicated on every device of `mesh` (unchanged without one)."""
    return state if mesh is None else replicate(state, mesh)
