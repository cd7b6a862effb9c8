"""Bad inputs are refused with one message before anything is compiled or written."""

from __future__ import annotations

import collections
import io
import json
import pickle
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
from archives import (
    cifar10_python_members,
    fake_cifar,
    make_cifar100_python_archive,
    write_tar_gz,
)
from tiny_run import main_env, run_main, tiny_config

from micronet_jax.config.validate import check_batch_sizes
from micronet_jax.errors import CheckpointError, ConfigError, DataError, MicronetError
from micronet_jax.main import run


def assert_refused(config, workdir: Path, error: type, pattern: str) -> None:
    """The run raises `error` matching `pattern`, and the workdir stays absent or empty."""
    with pytest.raises(error, match=pattern):
        run(config, str(workdir))
    assert not workdir.exists() or not any(workdir.iterdir()), list(workdir.rglob("*"))


@pytest.fixture
def config(tiny_archive):
    config = tiny_config("pipeline")
    config.data.dir = str(tiny_archive)
    return config


def test_train_batch_not_divisible_by_ghost_splits(config, tmp_path):
    config.train.batch_size = 30
    assert_refused(config, tmp_path / "w", ConfigError, r"train.batch_size=30 .*bn_splits \(4\)")


def test_eval_batch_not_divisible_by_ghost_splits(config, tmp_path):
    config.train.eval_batch_size = 10
    assert_refused(config, tmp_path / "w", ConfigError, r"train.eval_batch_size=10 .*multiple")


def test_cpu_devices_may_not_split_training(config, tmp_path):
    """One device per core is for eval: splitting training over them is refused (it is slower)."""
    config.cpu_devices = 2
    assert_refused(config, tmp_path / "w", ConfigError, r"train.data_parallel=False")
    config.cpu_devices = -1
    assert_refused(config, tmp_path / "w", ConfigError, r"cpu_devices must be >= 0")


def test_cpu_devices_for_eval_only_passes_validation(config, tmp_path):
    from micronet_jax.config.validate import validate_config

    config.cpu_devices = 0
    config.train.data_parallel = False
    validate_config(config, str(tmp_path / "w"))  # raises on refusal
    config.mode, config.train.data_parallel = "test", True  # test mode trains nothing
    validate_config(config, str(tmp_path / "w"))


def test_batch_must_divide_over_devices(config):
    config.train.batch_size = 36  # 9 per split: fine on one device, not on two
    check_batch_sizes(config, devices=1)
    with pytest.raises(ConfigError, match=r"devices \(2\) = 8"):
        check_batch_sizes(config, devices=2)


def test_targets_must_increase(config, tmp_path):
    config.pipeline.prune_targets = (60.0, 30.0)
    assert_refused(config, tmp_path / "w", ConfigError, "increase")


def test_targets_must_be_below_100(config, tmp_path):
    config.pipeline.exit_prune_targets = (50.0, 100.0)
    assert_refused(config, tmp_path / "w", ConfigError, r"\[0, 100\)")


@pytest.mark.parametrize("threshold", [0.0, 1.0, 1.5])
def test_threshold_outside_open_unit_interval(config, tmp_path, threshold):
    config.pipeline.threshold = threshold
    assert_refused(config, tmp_path / "w", ConfigError, r"threshold must be in \(0, 1\)")


def test_exit_block_out_of_range(config, tmp_path):
    config.model.exit_block = 2  # the tiny model has 3 blocks: the exit head fits after 0 or 1
    assert_refused(config, tmp_path / "w", ConfigError, r"exit block must be in \[0, 1\]")


def _policy(tmp_path: Path, rows) -> str:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(rows))
    return str(path)


def test_policy_with_unknown_op(config, tmp_path):
    config.data.policy = _policy(tmp_path, [["posterize", 0.5, 3, "Wobble", 0.2, 1]])
    assert_refused(config, tmp_path / "w", ConfigError, r"row 0 .*unknown op 'Wobble'")


def test_policy_with_malformed_row(config, tmp_path):
    config.data.policy = _policy(tmp_path, [["posterize", 0.5, 3, "rotate", 0.2]])
    assert_refused(config, tmp_path / "w", ConfigError, "expected 6 fields")


def test_policy_not_json(config, tmp_path):
    path = tmp_path / "policy.json"
    path.write_text("[[1, 2")
    config.data.policy = str(path)
    assert_refused(config, tmp_path / "w", ConfigError, "not a readable JSON policy")


def test_unknown_data_set(config, tmp_path):
    config.data.name = "imagenet"
    assert_refused(config, tmp_path / "w", ConfigError, "unknown data set 'imagenet'")


def test_unknown_mode(config, tmp_path):
    config.mode = "serve"
    assert_refused(config, tmp_path / "w", ConfigError, r"config.mode must be one of")


@pytest.mark.parametrize(
    "section, key, value, pattern",
    [
        ("train", "epochs", 0, "train.epochs must be positive"),
        ("train", "lr", -0.1, "train.lr must be positive"),
        ("train", "checkpoint_every", 0, "train.checkpoint_every must be positive"),
        ("train", "momentum", 1.0, r"train.momentum must be in \[0, 1\)"),
        ("train", "nan_policy", "ignore", "train.nan_policy must be one of"),
        ("pipeline", "epoch_scale", 0.0, "pipeline.epoch_scale must be positive"),
        ("pipeline", "prune_epochs", -5, "pipeline.prune_epochs must be positive"),
        ("model", "dtype", "float16", "model.dtype must be one of"),
        ("data", "num_train", -1, "data.num_train must be >= 0"),
    ],
)
def test_out_of_range_numbers(config, tmp_path, section, key, value, pattern):
    config[section][key] = value
    assert_refused(config, tmp_path / "w", ConfigError, pattern)


def test_data_dir_missing(config, tmp_path):
    config.data.dir = str(tmp_path / "nowhere")
    assert_refused(config, tmp_path / "w", DataError, "nowhere")


def test_data_dir_holds_the_wrong_archive(config, tmp_path):
    wrong = tmp_path / "cifar-100-python.tar.gz"
    make_cifar100_python_archive(wrong, n_train=20, n_test=10)
    config.data.dir = str(wrong)
    assert_refused(config, tmp_path / "w", DataError, "cifar-100|CIFAR-100|cifar10")


def test_truncated_archive(config, tmp_path, tiny_archive):
    cut = tmp_path / "cifar-10-python.tar.gz"
    data = tiny_archive.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    config.data.dir = str(cut)
    assert_refused(config, tmp_path / "w", DataError, str(cut))


def test_labels_out_of_range(config, tmp_path):
    data = fake_cifar(50, 10, 10)
    data.train.labels[3] = 12
    bad = write_tar_gz(tmp_path / "cifar-10-python.tar.gz", cifar10_python_members(data))
    config.data.dir = str(bad)
    assert_refused(config, tmp_path / "w", DataError, r"range 0..12, expected 0..9")


def write_fake_pth(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    """A torch zip checkpoint of float32 tensors, written with stand-in torch modules."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    def _rebuild_tensor_v2(*args):
        del args

    FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    torch.FloatStorage, utils._rebuild_tensor_v2, torch._utils = (
        FloatStorage,
        _rebuild_tensor_v2,
        utils,
    )

    class Storage:
        def __init__(self, key: str, n: int):
            self.key, self.n = key, n

    class Tensor:
        def __init__(self, storage: Storage, shape: tuple[int, ...]):
            self.storage, self.shape = storage, shape

        def __reduce__(self):
            stride = tuple(int(np.prod(self.shape[i + 1 :])) for i in range(len(self.shape)))
            hooks = collections.OrderedDict()
            return _rebuild_tensor_v2, (self.storage, 0, self.shape, stride, False, hooks)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return ("storage", FloatStorage, obj.key, "cpu", obj.n)
            return None

    state_dict, blobs = collections.OrderedDict(), {}
    for i, (name, array) in enumerate(tensors.items()):
        array = np.ascontiguousarray(array, np.float32)
        state_dict[name] = Tensor(Storage(str(i), array.size), array.shape)
        blobs[str(i)] = array.tobytes()
    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules["torch"], sys.modules["torch._utils"] = torch, utils
    buffer = io.BytesIO()
    try:
        Pickler(buffer, protocol=2).dump(state_dict)
    finally:
        for key, module in saved.items():
            if module is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = module
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buffer.getvalue())
        for key, blob in blobs.items():
            z.writestr(f"archive/data/{key}", blob)
        z.writestr("archive/version", "3\n")
    return path


def test_pth_with_missing_keys(config, tmp_path):
    pth = write_fake_pth(tmp_path / "model.pth", {"_fc.bias": np.zeros(100)})
    config.mode = "test"
    config.checkpoint = str(pth)
    assert_refused(config, tmp_path / "w", CheckpointError, r"model.pth: checkpoint lacks")


def test_pth_that_is_not_a_checkpoint(config, tmp_path):
    pth = tmp_path / "model.pth"
    pth.write_bytes(b"not a torch file at all")
    config.mode = "test"
    config.checkpoint = str(pth)
    assert_refused(config, tmp_path / "w", CheckpointError, "model.pth")


# --- through the command line: exit status, one message on stderr, no traceback ---------


def cli(tmp_path: Path, archive: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_main(
        tmp_path / "w", archive, *overrides, env=main_env(tmp_path / "cache"), timeout=300
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, status, message",
    [
        ("--config.train.batch_size=abc", 2, "invalid literal for int() with base 10: 'abc'"),
        ("--config.train.nope=1", 2, "unknown config key 'nope' (in --config.train.nope)"),
        ("--config.mode=serve", 2, "config.mode must be one of"),
        ("--config.train.batch_size=30", 2, "train.batch_size=30 must be a multiple"),
        ("--config.data.name=svhn", 2, "unknown data set 'svhn'"),
    ],
)
def test_cli_refuses_with_one_message(tmp_path, tiny_archive, override, status, message):
    done = cli(tmp_path, tiny_archive, override)
    assert done.returncode == status, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "w").exists()


def test_cli_refuses_a_missing_data_dir(tmp_path):
    done = cli(tmp_path, tmp_path / "nowhere.tar.gz")
    assert done.returncode == 2
    assert "error:" in done.stderr and "nowhere.tar.gz" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "w").exists()


def test_errors_are_micronet_errors():
    for error in (ConfigError, DataError, CheckpointError):
        assert issubclass(error, MicronetError)
