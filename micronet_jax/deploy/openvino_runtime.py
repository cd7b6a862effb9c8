"""OpenVINO, imported without its telemetry, and one CPU plugin per process.

`import openvino` sends a usage event, and on Linux it sends it from a child process forked
from a thread pool thread. Forking a multithreaded process (JAX's, TensorFlow's) copies it
mid-flight: the child can deadlock, and it inherits every open pipe and socket of its parent
(a test runner's channel to its workers, a multi-host job's sockets). OpenVINO's telemetry
declines to send anything when it finds itself in a CI job (`CI=true`), which it decides once,
when the first import creates its singleton; the import here makes it decide that.

Each `openvino.Core` loads its own CPU plugin, and each plugin, when it loads, gives the
calling thread a new alternate signal stack (a small mapping), keeping the previous one to
put back when it is destroyed. Two cores released in the order they were made therefore leave
the thread's alternate stack pointing at memory the first one has unmapped, and the next
signal that thread takes (a Ctrl-C, a SIGTERM from a scheduler) ends the process with a
segmentation fault, no Python traceback. Even while it is mapped, that stack is too small for
CPython's signal handler the first time it runs (the dynamic linker resolves its symbols
there). So the project compiles through `core()`: one core per process, its plugin loaded
once, and the thread's own alternate stack put back straight after.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from collections.abc import Iterator
from typing import Any


def import_openvino() -> Any:
    """The `openvino` module, its telemetry off for this process (the environment is left as
    it was)."""
    if "openvino" in sys.modules:
        return sys.modules["openvino"]
    before = os.environ.get("CI")
    os.environ["CI"] = "true"
    try:
        import openvino
    finally:
        if before is None:
            del os.environ["CI"]
        else:
            os.environ["CI"] = before
    return openvino


@functools.cache
def core() -> Any:
    """This process's one `openvino.Core`, its CPU plugin already loaded, the calling thread's
    alternate signal stack as it was before."""
    ov = import_openvino()
    with signal_stack_kept():
        shared = ov.Core()
        shared.get_property("CPU", "FULL_DEVICE_NAME")  # loads the CPU plugin now
    return shared


def compile_model(path: str | os.PathLike, config: dict | None = None) -> Any:
    """`path` (ONNX or OpenVINO IR) compiled for the CPU by the process's one core."""
    return core().compile_model(str(path), "CPU", config or {})


class _Stack(ctypes.Structure):
    _fields_ = [
        ("ss_sp", ctypes.c_void_p),
        ("ss_flags", ctypes.c_int),
        ("ss_size", ctypes.c_size_t),
    ]


def _sigaltstack(new: _Stack | None) -> _Stack:
    libc = ctypes.CDLL(None, use_errno=True)
    old = _Stack()
    if libc.sigaltstack(ctypes.byref(new) if new is not None else None, ctypes.byref(old)):
        raise OSError(ctypes.get_errno(), "sigaltstack failed")
    return old


def alternate_signal_stack() -> tuple[int, int, int] | None:
    """The calling thread's alternate signal stack: (address, size, flags); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    current = _sigaltstack(None)
    return current.ss_sp or 0, current.ss_size, current.ss_flags


@contextlib.contextmanager
def signal_stack_kept() -> Iterator[None]:
    """Puts the calling thread's alternate signal stack back as it was when the block ends."""
    if not sys.platform.startswith("linux"):
        yield
        return
    before = _sigaltstack(None)
    try:
        yield
    finally:
        _sigaltstack(before)
