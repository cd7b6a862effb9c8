"""Process-wide JAX settings a run wants before its first compilation."""

from __future__ import annotations

import os
from pathlib import Path

import jax


def default_cache_dir() -> Path:
    """`$MICRONET_CACHE_DIR`, else `~/.cache/micronet_jax/xla`."""
    env = os.environ.get("MICRONET_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "micronet_jax" / "xla"


def enable_compilation_cache(path: str | Path | None = None) -> Path | None:
    """Persist compiled programs, so a resumed or repeated run skips most compilation.

    `path` '' or None uses `default_cache_dir()`; 'none' turns the cache off.
    """
    if path is not None and str(path).lower() == "none":
        return None
    directory = Path(path) if path else default_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory
