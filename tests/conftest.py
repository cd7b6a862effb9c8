"""Shared test fixtures: where ../shared lives, and what happens when it is absent."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tiny_run import run_main, with_fast_compile

REPO = Path(__file__).resolve().parents[1]
# The suite is bound by XLA's compile times, not by running what it compiles: without LLVM's
# optimisation passes and with XLA's older CPU fusion emitter the tiny network's train step
# compiles in a third of the time (2.8 s against 8.4 s here). Every run a test compares is
# compiled under the same flags (the test process and the runs it starts, which inherit
# them; `tiny_run.xla_flags` for a child that sets flags of its own), except where the
# comparison is about a user's compiler flags (`tiny_run.user_env`).
os.environ["XLA_FLAGS"] = with_fast_compile(os.environ.get("XLA_FLAGS", ""))

SHARED = Path(os.environ.get("MICRONET_SHARED", REPO.parent / "shared"))
REQUIRE_SHARED = os.environ.get("MICRONET_REQUIRE_SHARED") == "1"
# CI (.ci/run) sets this: a skipped test (an extra not installed, a file gone missing) fails
# the session instead of passing it silently.
NO_SKIPS = os.environ.get("MICRONET_NO_SKIPS") == "1"


def _shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        message = f"{path} is absent (tests that need real data or checkpoints use ../shared)"
        if REQUIRE_SHARED:
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def cifar10_archive() -> Path:
    """The real CIFAR-10 archive in ../shared/data."""
    return _shared_path("data", "cifar-10-python.tar.gz")


@pytest.fixture(scope="session")
def original_checkpoints() -> Path:
    """The original's released checkpoints in ../shared/reference/osi_ai."""
    return _shared_path("reference", "osi_ai")


def pytest_sessionfinish(session, exitstatus) -> None:
    """With MICRONET_NO_SKIPS=1, any skipped test (or module) fails the session, named."""
    if not NO_SKIPS or hasattr(session.config, "workerinput"):  # the controller decides
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if not skipped:
        return
    reporter.write_sep("=", f"{len(skipped)} skipped, and MICRONET_NO_SKIPS=1 forbids skips")
    for report in skipped:
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        reporter.write_line(f"SKIPPED {report.nodeid}: {reason}")
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(config, items) -> None:
    """The slow tests first, each group in its file order: with `-n 2` the two workers take
    the long tests while both are free and the short ones fill the end, instead of a long
    test collected last running alone (longest first is the classic rule for packing jobs
    onto machines). Test results do not depend on the order."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_configure(config) -> None:
    """Every program the tests compile goes to the persistent compilation cache the runs use
    (`$MICRONET_CACHE_DIR`, default ~/.cache/micronet_jax/xla): compiled once per session, and
    on a working machine once until the code changes. CI points it at an empty folder."""
    from micronet_jax.backend import enable_compilation_cache

    enable_compilation_cache()


@pytest.fixture(autouse=True)
def _signal_stack_unchanged() -> Iterator[None]:
    """Fails a test that leaves this thread's alternate signal stack changed. A runtime that
    swaps in a small stack of its own (OpenVINO's CPU plugin does, see
    `micronet_jax.deploy.openvino_runtime`) makes a later test's first signal a segmentation
    fault that ends the whole pytest-xdist worker, far from its cause; this names the cause."""
    from micronet_jax.deploy.openvino_runtime import alternate_signal_stack

    before = alternate_signal_stack()
    yield
    after = alternate_signal_stack()
    if after != before:
        pytest.fail(
            f"this test changed the thread's alternate signal stack ({before} -> {after}); "
            "compile OpenVINO models through micronet_jax.deploy.openvino_runtime"
        )


@pytest.fixture(scope="session")
def compile_cache() -> Path:
    """That cache's folder, for the runs the tests start on the command line."""
    from micronet_jax.backend import default_cache_dir

    return default_cache_dir()


def _session_root(tmp_path_factory) -> Path:
    """A folder every pytest-xdist worker of this session sees: the session's base temp
    folder, or under xdist its parent (each worker's base temp is a folder inside it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    with lock.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder `name` of this session, filled by `build(folder)` by the first worker that
    asks for it; any other worker waits for it and then reads the same folder. So a costly
    artefact (a compiled and trained run) is made once per session, not once per worker."""
    root = _session_root(tmp_path_factory)
    folder, complete = root / name, root / f"{name}.complete"
    with _exclusive(root / f"{name}.lock"):
        if not complete.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            build(folder)
            complete.touch()
    return folder


@pytest.fixture(scope="session")
def build_once(tmp_path_factory) -> Callable[[str, Callable[[Path], None]], Path]:
    """`build_once(name, build)`: `built_once` for a test module's own costly reference."""
    return lambda name, build: built_once(tmp_path_factory, name, build)


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory) -> Path:
    """A generated CIFAR-10 archive in the standard layout, sized for the tiny network's runs
    (160 training and 32 test images), one for the whole session. Runs only read it."""
    from archives import make_cifar10_python_archive

    def build(folder: Path) -> None:
        make_cifar10_python_archive(folder / "cifar-10-python.tar.gz", n_train=160, n_test=32)

    return built_once(tmp_path_factory, "data", build) / "cifar-10-python.tar.gz"


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, tiny_archive, compile_cache):
    """A finished run of `tests/configs/tiny.py:pipeline` on `tiny_archive`, run once per
    session from the command line as a user runs it, compiled with XLA's default flags
    (`tiny_run.user_env`): (config, workdir, report). The pipeline, report, TensorBoard and
    kill/resume tests read it; a test that writes into the run (plots, a rerun) takes
    `tiny_pipeline_copy` instead, since other workers read it too."""
    from tiny_run import tiny_config, user_env

    def build(folder: Path) -> None:
        done = run_main(folder / "run", tiny_archive, env=user_env(compile_cache), timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]

    workdir = built_once(tmp_path_factory, "tiny_pipeline", build) / "run"
    config = tiny_config("pipeline")
    config.data.dir = str(tiny_archive)
    return config, workdir, json.loads((workdir / "report.json").read_text())


@pytest.fixture
def tiny_pipeline_copy(tiny_pipeline, tmp_path) -> Path:
    """This test's own copy of the finished tiny pipeline's workdir, to write into."""
    return Path(shutil.copytree(tiny_pipeline[1], tmp_path / "run"))


@pytest.fixture(scope="session")
def prepared_tfds(cifar10_archive, build_once):
    """CIFAR-10 prepared by TFDS from the real archive, once as TFRecord (its default) and
    once as array_record, each in a data folder of its own."""
    pytest.importorskip("tensorflow_datasets", reason="the tfds extra")
    from tfds_prepared import prepare

    def build(folder: Path) -> None:
        for file_format in ("tfrecord", "array_record"):
            prepare(cifar10_archive, folder / file_format, file_format)

    return build_once("tfds_prepared", build)
