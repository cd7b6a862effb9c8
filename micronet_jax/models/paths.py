"""Names of parameters: 'blocks_3/expand_conv/kernel' for a pytree key path.

The one spelling of a parameter's place in the tree, shared by pruning (which tensors to
mask), quantisation (which grid a kernel gets), the counter's per-layer rows and the
checkpoint import; it lives with the model so that none of them needs another's module.
"""

from __future__ import annotations


def path_name(path: tuple) -> str:
    """'blocks_3/expand_conv/kernel' for a pytree key path."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
