"""Process-wide JAX settings a run wants before its first compilation, and the platform
programs are built for."""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from pathlib import Path

import jax

from micronet_jax.errors import ConfigError


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


def use_cpu_cores(count: int | None = None) -> int:
    """Give the CPU backend one device per core (`count`, default all of this process's cores)
    so that eval splits its batches over them (`models.microbatch.split_over_cpu_devices`).

    Must run before JAX first touches a backend. Accelerator runs are unaffected: their
    devices stay the default. Returns the number of CPU devices asked for.
    """
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise ConfigError(f"cpu_devices must be an int >= 0 (0: one per core), got {count!r}")
    count = count or len(os.sched_getaffinity(0))
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError as exc:  # a backend is already up: too late to change its devices
        raise ConfigError(f"use_cpu_cores must run before JAX's first operation: {exc}") from None
    return count


PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("target", default=None)


def target_platform() -> str:
    """The platform the programs being traced will run on: the one `lowering_for` names, else
    JAX's default backend ('cpu', 'gpu' reads as 'cuda', 'tpu').

    Choices made while tracing (the convolution lowering, CPU micro-batches, steps per
    dispatch) read this, not the host, so a program exported for a GPU is the GPU's program.
    """
    target = _TARGET.get()
    if target is not None:
        return target
    backend = jax.default_backend()
    return "cuda" if backend == "gpu" else backend


@contextlib.contextmanager
def lowering_for(platform: str) -> Iterator[str]:
    """Trace for `platform` (e.g. for `jax.export(..., platforms=(platform,))` on a host
    without it). JAX's trace caches are cleared on entry and exit, since a function traced
    for one platform must not be reused for another."""
    if platform not in PLATFORMS:
        raise ConfigError(f"platform must be one of {PLATFORMS}, got {platform!r}")
    jax.clear_caches()
    token = _TARGET.set(platform)
    try:
        yield platform
    finally:
        _TARGET.reset(token)
        jax.clear_caches()


def on_cpu() -> bool:
    """Whether the programs being traced target a CPU."""
    return target_platform() == "cpu"
