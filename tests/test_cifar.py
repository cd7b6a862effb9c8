"""CIFAR loading: exact round trips through every standard layout, downloads, bad inputs."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from archives import (
    CIFAR10_PYTHON,
    CIFAR100_BINARY,
    CIFAR100_PYTHON,
    FakeCifar,
    FakeSplit,
    cifar10_python_members,
    cifar100_binary_members,
    cifar100_python_members,
    fake_cifar,
    make_cifar10_python_archive,
    make_cifar100_binary_archive,
    make_cifar100_python_archive,
    write_folder,
    write_tar_gz,
)

from micronet_jax.data.cifar import OFFICIAL, CifarSplit, load_cifar, load_train_test
from micronet_jax.errors import DataError


def assert_split_equal(got: CifarSplit, want: FakeSplit, data: FakeCifar) -> None:
    assert got.images.dtype == np.uint8 and got.images.shape == want.images.shape
    assert got.images.flags.c_contiguous and got.images.flags.writeable
    np.testing.assert_array_equal(got.images, want.images)
    assert got.labels.dtype == np.int32
    np.testing.assert_array_equal(got.labels, want.labels)
    assert got.num_classes == data.num_classes
    assert got.class_names == data.class_names
    if want.coarse_labels is None:
        assert got.coarse_labels is None
    else:
        np.testing.assert_array_equal(got.coarse_labels, want.coarse_labels)
        assert got.coarse_class_names == data.coarse_class_names


def assert_loads(name: str, data_dir: Path, data: FakeCifar) -> None:
    train, test = load_train_test(name, data_dir, download=False)
    assert_split_equal(train, data.train, data)
    assert_split_equal(test, data.test, data)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("given", ["archive", "directory"])
def test_cifar100_python_archive(tmp_path, given):
    data = make_cifar100_python_archive(tmp_path / "cifar-100-python.tar.gz")
    assert_loads(
        "cifar100", tmp_path / "cifar-100-python.tar.gz" if given == "archive" else tmp_path, data
    )


@pytest.mark.parametrize("given", ["folder", "parent"])
def test_cifar100_extracted_folder(tmp_path, given):
    data = fake_cifar(40, 20)
    write_folder(tmp_path, cifar100_python_members(data))
    assert_loads("cifar100", tmp_path / CIFAR100_PYTHON if given == "folder" else tmp_path, data)


def test_cifar10_python_archive(tmp_path):
    data = make_cifar10_python_archive(tmp_path / "cifar-10-python.tar.gz")
    assert_loads("cifar10", tmp_path, data)


def test_cifar10_extracted_folder(tmp_path):
    data = fake_cifar(40, 8, 10, seed=4)
    write_folder(tmp_path, cifar10_python_members(data))
    assert_loads("cifar10", tmp_path / CIFAR10_PYTHON, data)


def test_cifar100_binary_archive(tmp_path):
    # TFDS keeps downloads under hashed names: the layout is found from the contents.
    data = make_cifar100_binary_archive(tmp_path / "downloads" / "kriz_cifar-100-binaryAbC.tar.gz")
    assert_loads("cifar100", tmp_path / "downloads" / "kriz_cifar-100-binaryAbC.tar.gz", data)


def test_cifar100_binary_found_in_directory(tmp_path):
    data = make_cifar100_binary_archive(tmp_path / "cifar-100-binary.tar.gz", seed=3)
    test = load_cifar("cifar100", tmp_path, "test", download=False)
    assert_split_equal(test, data.test, data)


def test_single_split_and_default_dir(tmp_path, monkeypatch):
    data = make_cifar100_python_archive(tmp_path / "cifar-100-python.tar.gz", seed=1)
    monkeypatch.setenv("MICRONET_DATA", str(tmp_path))
    test = load_cifar("cifar100", split="test", download=False)
    assert len(test) == 20
    assert_split_equal(test, data.test, data)


@pytest.mark.shared
def test_real_cifar10(cifar10_archive):
    start = time.perf_counter()
    train, test = load_train_test("cifar10", cifar10_archive, download=False)
    seconds = time.perf_counter() - start
    assert train.images.shape == (50_000, 32, 32, 3) and test.images.shape == (10_000, 32, 32, 3)
    assert train.images.dtype == test.images.dtype == np.uint8
    assert train.labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(test.labels, minlength=10), [1000] * 10)
    np.testing.assert_array_equal(np.bincount(train.labels, minlength=10), [5000] * 10)
    assert test.class_names[:3] == ("airplane", "automobile", "bird")
    # Real photographs, channels in RGB order: mean per channel about 0.49 / 0.48 / 0.45.
    mean = train.images[:5000].reshape(-1, 3).mean(axis=0) / 255
    np.testing.assert_allclose(mean, [0.492, 0.483, 0.447], atol=0.01)
    assert seconds < 30, f"loading took {seconds:.1f} s"


# ---------------------------------------------------------------- downloads


def _archive_to_serve(folder: Path) -> tuple[FakeCifar, str]:
    data = make_cifar100_python_archive(folder / "cifar-100-python.tar.gz", seed=2)
    md5 = hashlib.md5((folder / "cifar-100-python.tar.gz").read_bytes()).hexdigest()
    return data, md5


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A folder served on 127.0.0.1 (never the real network); yields (folder, base URL)."""
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "*")
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(params=["file", "http"])
def remote(request, tmp_path):
    """(folder, base URL) of a file:// or local http:// source."""
    if request.param == "http":
        return request.getfixturevalue("served")
    folder = tmp_path / "remote"
    folder.mkdir()
    return folder, folder.as_uri()


def test_download_verified(tmp_path, remote):
    folder, base = remote
    data, md5 = _archive_to_serve(folder)
    target = tmp_path / "data"
    url = f"{base}/cifar-100-python.tar.gz"
    test = load_cifar("cifar100", target, "test", url=url, md5=md5)
    assert_split_equal(test, data.test, data)
    assert sorted(p.name for p in target.iterdir()) == ["cifar-100-python.tar.gz"]
    # Present now: a second load reads it without downloading.
    assert len(load_cifar("cifar100", target, "test", url=f"{base}/gone.tar.gz")) == 20


def test_download_checksum_mismatch_leaves_nothing(tmp_path, remote):
    folder, base = remote
    _archive_to_serve(folder)
    target = tmp_path / "data"
    url = f"{base}/cifar-100-python.tar.gz"
    with pytest.raises(DataError, match=r"damaged: md5 [0-9a-f]{32}, expected 0{32}"):
        load_cifar("cifar100", target, url=url, md5="0" * 32)
    assert list(target.iterdir()) == []


def test_download_failure(tmp_path):
    url = (tmp_path / "nowhere.tar.gz").as_uri()
    with pytest.raises(DataError, match=r"Could not download .*nowhere\.tar\.gz.*No CIFAR-100"):
        load_cifar("cifar100", tmp_path / "data", url=url)
    assert list((tmp_path / "data").iterdir()) == []


def test_local_archive_checksum_is_optional(tmp_path):
    path = tmp_path / "cifar-100-python.tar.gz"
    make_cifar100_python_archive(path)
    assert len(load_cifar("cifar100", path, download=False)) == 40  # accepted on contents
    with pytest.raises(DataError, match=f"expected {OFFICIAL['cifar100'].md5}: not the official"):
        load_cifar("cifar100", path, download=False, verify_checksum=True)
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    assert len(load_cifar("cifar100", path, verify_checksum=True, md5=md5)) == 40


# ---------------------------------------------------------------- bad inputs


def test_missing_path(tmp_path):
    official = OFFICIAL["cifar100"]
    message = rf"No CIFAR-100 data in {re.escape(str(tmp_path))}.*cifar-100-python\.tar\.gz"
    with pytest.raises(DataError, match=message + rf".*{re.escape(official.url)}"):
        load_cifar("cifar100", tmp_path, download=False)


def test_missing_archive_file(tmp_path):
    with pytest.raises(DataError, match=r"absent\.tar\.gz does not exist.*cifar-10-python"):
        load_cifar("cifar10", tmp_path / "absent.tar.gz")


def test_truncated_archive(tmp_path):
    path = tmp_path / "cifar-100-python.tar.gz"
    make_cifar100_python_archive(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cifar-100-python\.tar\.gz.* is truncated or corrupt"):
        load_train_test("cifar100", path, download=False)


def test_corrupt_archive(tmp_path):
    path = tmp_path / "cifar-100-python.tar.gz"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
    with pytest.raises(DataError, match=r"cifar-100-python\.tar\.gz is truncated or corrupt"):
        load_cifar("cifar100", path, download=False)


def test_corrupt_member(tmp_path):
    members = cifar100_python_members(fake_cifar(40, 20))
    members[f"{CIFAR100_PYTHON}/train"] = b"\x80\x02}q\x00(garbage"
    write_tar_gz(tmp_path / "c.tar.gz", members)
    with pytest.raises(DataError, match=r"cifar-100-python/train is truncated or corrupt"):
        load_cifar("cifar100", tmp_path / "c.tar.gz", download=False)


def test_pickle_cannot_run_code(tmp_path):
    class Hostile:
        def __reduce__(self):
            return (print, ("side effect",))

    members = cifar100_python_members(fake_cifar(40, 20))
    members[f"{CIFAR100_PYTHON}/meta"] = {b"fine_label_names": Hostile()}
    write_folder(tmp_path, members)
    with pytest.raises(
        DataError, match=r"meta refers to (__builtin__|builtins)\.print, which a CIFAR batch never"
    ):
        load_cifar("cifar100", tmp_path, download=False)


def test_label_out_of_range(tmp_path):
    members = cifar100_python_members(fake_cifar(40, 20))
    members[f"{CIFAR100_PYTHON}/test"][b"fine_labels"][5] = 100
    write_tar_gz(tmp_path / "cifar-100-python.tar.gz", members)
    with pytest.raises(
        DataError, match=r"test\) b'fine_labels' range \d+\.\.100, expected 0\.\.99"
    ):
        load_cifar("cifar100", tmp_path, "test", download=False)


def test_binary_label_out_of_range(tmp_path):
    data = fake_cifar(40, 20)
    data.train.coarse_labels[0] = 20
    write_tar_gz(tmp_path / "b.tar.gz", cifar100_binary_members(data))
    with pytest.raises(
        DataError, match=r"train\.bin\) coarse labels range \d+\.\.20, expected 0\.\.19"
    ):
        load_cifar("cifar100", tmp_path / "b.tar.gz", download=False)


def test_labels_do_not_match_images(tmp_path):
    members = cifar100_python_members(fake_cifar(40, 20))
    del members[f"{CIFAR100_PYTHON}/train"][b"fine_labels"][-1]
    write_tar_gz(tmp_path / "cifar-100-python.tar.gz", members)
    with pytest.raises(DataError, match=r"has 39 labels for 40 images"):
        load_cifar("cifar100", tmp_path, download=False)


def test_cifar10_batch_smaller_than_meta_says(tmp_path):
    members = cifar10_python_members(fake_cifar(40, 8, 10))
    batch = members[f"{CIFAR10_PYTHON}/data_batch_3"]
    batch[b"data"], batch[b"labels"] = batch[b"data"][:7], batch[b"labels"][:7]
    write_tar_gz(tmp_path / "cifar-10-python.tar.gz", members)
    with pytest.raises(DataError, match=r"data_batch_3\) has 7 images, but batches\.meta says 8"):
        load_cifar("cifar10", tmp_path, download=False)


def test_pixels_not_whole_images(tmp_path):
    members = cifar100_python_members(fake_cifar(40, 20))
    members[f"{CIFAR100_PYTHON}/test"][b"data"] = np.zeros(20 * 3072 - 1, np.uint8)
    write_folder(tmp_path, members)
    with pytest.raises(DataError, match=r"b'data' has shape \(61439,\), expected N×3072"):
        load_cifar("cifar100", tmp_path, "test", download=False)


def test_binary_truncated_record(tmp_path):
    members = cifar100_binary_members(fake_cifar(40, 20))
    members[f"{CIFAR100_BINARY}/test.bin"] = members[f"{CIFAR100_BINARY}/test.bin"][:-10]
    write_folder(tmp_path, members)
    with pytest.raises(
        DataError, match=r"test\.bin\) is 61470 bytes, expected a whole number of 3074-byte"
    ):
        load_cifar("cifar100", tmp_path / CIFAR100_BINARY, "test", download=False)


def test_wrong_data_set(tmp_path):
    make_cifar10_python_archive(tmp_path / "c10.tar.gz")
    with pytest.raises(DataError, match=r"c10\.tar\.gz is CIFAR-10 .* but CIFAR-100 was asked for"):
        load_cifar("cifar100", tmp_path / "c10.tar.gz", download=False)
    make_cifar100_binary_archive(tmp_path / "c100.tar.gz")
    with pytest.raises(
        DataError, match=r"c100\.tar\.gz is CIFAR-100 .* but CIFAR-10 was asked for"
    ):
        load_cifar("cifar10", tmp_path / "c100.tar.gz", download=False)


def test_wrong_data_set_by_class_names(tmp_path):
    members = cifar100_python_members(fake_cifar(40, 20))
    members[f"{CIFAR100_PYTHON}/meta"][b"fine_label_names"] = [b"cat"] * 10
    write_folder(tmp_path, members)
    with pytest.raises(DataError, match=r"meta lists 10 class names, expected 100: wrong data set"):
        load_cifar("cifar100", tmp_path, download=False)


def test_unknown_layout(tmp_path):
    write_tar_gz(tmp_path / "x.tar.gz", {"photos/cat.png": b"\x89PNG"})
    with pytest.raises(
        DataError, match=r"does not hold the CIFAR-100 train files \(found photos/cat\.png\)"
    ):
        load_cifar("cifar100", tmp_path / "x.tar.gz", download=False)


def test_bad_arguments(tmp_path):
    with pytest.raises(DataError, match=r"name='imagenet' is not supported"):
        load_cifar("imagenet", tmp_path)
    with pytest.raises(DataError, match=r"split='valid' is not supported"):
        load_cifar("cifar100", tmp_path, "valid")


# ---------------------------------------------------------------- TFDS


def test_tfds_not_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import now fails
    with pytest.raises(
        DataError,
        match=r"tensorflow_datasets, which is not installed: pip install 'micronet_jax\[tfds\]'",
    ):
        load_cifar("cifar100", tmp_path, source="tfds")


FORMATS = ("tfrecord", "array_record")  # the formats conftest.prepared_tfds prepares


@pytest.fixture(scope="session")
def cifar10_reference(cifar10_archive):
    return load_train_test("cifar10", cifar10_archive, source="archive", download=False)


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize("file_format", FORMATS)
def test_a_really_prepared_tfds_cifar10_reads_as_the_archive(
    prepared_tfds, cifar10_reference, file_format
):
    """Images, labels, class names and both splits, in the archive's order, whichever format
    TFDS prepared them in; the splits say where they came from and in what format."""
    from tfds_prepared import archive_indices

    archive_train, archive_test = cifar10_reference
    train_indices, test_count = archive_indices()
    train, test = load_train_test("cifar10", prepared_tfds / file_format, source="tfds")
    np.testing.assert_array_equal(train.images, archive_train.images[train_indices])
    np.testing.assert_array_equal(train.labels, archive_train.labels[train_indices])
    np.testing.assert_array_equal(test.images, archive_test.images[:test_count])
    np.testing.assert_array_equal(test.labels, archive_test.labels[:test_count])
    assert train.class_names == archive_train.class_names and test.num_classes == 10
    assert test.source.startswith(f"TFDS ({file_format}) ")


@pytest.mark.slow
@pytest.mark.shared
def test_tfrecord_without_tensorflow_names_both_fixes(prepared_tfds, monkeypatch):
    from micronet_jax.data import cifar

    real = cifar.importlib.util.find_spec
    monkeypatch.setattr(
        cifar.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "tensorflow" else real(name, *args),
    )
    with pytest.raises(DataError) as error:
        load_train_test("cifar10", prepared_tfds / "tfrecord", source="tfds")
    message = str(error.value)
    assert "prepared as tfrecord" in message and "pip install tensorflow" in message
    assert "file_format='array_record'" in message
    # array_record needs no TensorFlow
    train, _ = load_train_test("cifar10", prepared_tfds / "array_record", source="tfds")
    assert train.source.startswith("TFDS (array_record)")


@pytest.mark.slow
@pytest.mark.shared
def test_auto_reads_a_prepared_tfds_before_downloading(prepared_tfds, tmp_path):
    """With no archive in the data folder, `source='auto'` reads the TFDS data set prepared
    there instead of downloading (the download address here does not exist: a download
    would fail)."""
    folder = prepared_tfds / "tfrecord"
    nowhere = (tmp_path / "nowhere.tar.gz").as_uri()
    train, test = load_train_test("cifar10", folder, source="auto", url=nowhere)
    assert train.source.startswith("TFDS (tfrecord)") and len(test.labels) == 100


@pytest.mark.slow
@pytest.mark.shared
def test_a_run_trains_on_tfrecord_data_and_says_so(prepared_tfds, tmp_path, compile_cache):
    """`--config.data.source=tfds` on a TFRecord-prepared CIFAR-10: stage A trains, and the
    banner names TFDS, the format it read and the folder."""
    from tiny_run import TINY, main_env, run_main

    folder = prepared_tfds / "tfrecord"
    done = run_main(
        tmp_path / "run",
        folder,
        "--config.data.source=tfds",
        "--config.train.epochs=1",
        env=main_env(compile_cache),
        config=str(TINY),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data: cifar10 from TFDS (tfrecord) " in done.stdout
    assert "200 train / 100 test images" in done.stdout


def test_no_data_is_one_line_naming_every_source_and_nothing_from_tfds(tmp_path):
    """With TFDS installed and no data anywhere, loading says one thing: where it looked and
    every source it takes (the archive, its extracted folder, a data set prepared by TFDS).
    TFDS is not asked about a folder that does not exist (asked, it logs a warning of its
    own about the missing folder: the control)."""
    pytest.importorskip("tensorflow_datasets", reason="the tfds extra")
    code = (
        "from micronet_jax.data.cifar import load_train_test\n"
        "from micronet_jax.errors import DataError\n"
        "try:\n"
        f"    load_train_test('cifar100', {str(tmp_path / 'none')!r}, download=False)\n"
        "except DataError as error:\n"
        "    print(error)\n"
    )
    control = "import tensorflow_datasets as tfds\ntfds.builder('cifar100').is_prepared()\n"
    env = {**os.environ, "HOME": str(tmp_path), "TFDS_DATA_DIR": str(tmp_path / "tfds")}
    env.pop("MICRONET_DATA", None)
    ours = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    theirs = subprocess.run(
        [sys.executable, "-c", control], env=env, capture_output=True, text=True
    )
    assert ours.returncode == 0 and theirs.returncode == 0
    assert "dataset_info.json" in theirs.stderr  # TFDS's own notice, when asked
    assert ours.stderr == ""
    message = ours.stdout.strip()
    assert "\n" not in message
    for source in ("cifar-100-python.tar.gz", "extracted folder", "TFDS"):
        assert source in message
