"""OpenVINO, imported without its telemetry.

`import openvino` sends a usage event, and on Linux it sends it from a child process forked
from a thread pool thread. Forking a multithreaded process (JAX's, TensorFlow's) copies it
mid-flight: the child can deadlock, and it inherits every open pipe and socket of its parent
(a test runner's channel to its workers, a multi-host job's sockets). OpenVINO's telemetry
declines to send anything when it finds itself in a CI job (`CI=true`), which it decides once,
when the first import creates its singleton; the import here makes it decide that.
"""

from __future__ import annotations

import os
import sys
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
