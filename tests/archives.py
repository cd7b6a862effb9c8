"""Small CIFAR archives in the standard layouts, built from known random data, for tests.

Each `make_*_archive(path, n_train, n_test, seed=...)` writes a .tar.gz and returns the data
it holds (`FakeCifar`, images NHWC) to compare a loader's output with. To build a damaged or
unusual archive, take the members from `*_members(fake_cifar(...))` (member path → bytes, or a
batch dict that is pickled when written), change them, and write them with `write_tar_gz` or
`write_folder`.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CIFAR100_PYTHON = "cifar-100-python"
CIFAR10_PYTHON = "cifar-10-batches-py"
CIFAR100_BINARY = "cifar-100-binary"
NUM_COARSE = 20

Members = dict[str, bytes | dict]


@dataclass
class FakeSplit:
    images: np.ndarray  # (N, 32, 32, 3) uint8
    labels: np.ndarray  # (N,) int64
    coarse_labels: np.ndarray | None


@dataclass
class FakeCifar:
    train: FakeSplit
    test: FakeSplit
    num_classes: int
    class_names: tuple[str, ...]
    coarse_class_names: tuple[str, ...] | None


def fake_cifar(n_train: int, n_test: int, num_classes: int = 100, *, seed: int = 0) -> FakeCifar:
    """Random pixels and labels; coarse labels too when num_classes is 100."""
    rng = np.random.default_rng(seed)
    coarse = num_classes == 100

    def split(n: int) -> FakeSplit:
        return FakeSplit(
            images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            labels=rng.integers(0, num_classes, n),
            coarse_labels=rng.integers(0, NUM_COARSE, n) if coarse else None,
        )

    return FakeCifar(
        train=split(n_train),
        test=split(n_test),
        num_classes=num_classes,
        class_names=tuple(f"class_{i}" for i in range(num_classes)),
        coarse_class_names=tuple(f"super_{i}" for i in range(NUM_COARSE)) if coarse else None,
    )


def to_chw_rows(images: np.ndarray) -> np.ndarray:
    """NHWC images → (N, 3072) rows in the archives' channel-major order."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), -1)


def _names(names: tuple[str, ...]) -> list[bytes]:
    return [n.encode() for n in names]


def cifar100_python_members(data: FakeCifar) -> Members:
    """`cifar-100-python/{train,test,meta}` as the official archive has them."""
    members: Members = {}
    for split_name in ("train", "test"):
        split = getattr(data, split_name)
        members[f"{CIFAR100_PYTHON}/{split_name}"] = {
            b"filenames": [f"{split_name}_{i}.png".encode() for i in range(len(split.labels))],
            b"batch_label": f"{split_name} batch".encode(),
            b"fine_labels": split.labels.tolist(),
            b"coarse_labels": split.coarse_labels.tolist(),
            b"data": to_chw_rows(split.images),
        }
    members[f"{CIFAR100_PYTHON}/meta"] = {
        b"fine_label_names": _names(data.class_names),
        b"coarse_label_names": _names(data.coarse_class_names),
    }
    return members


def cifar10_python_members(data: FakeCifar) -> Members:
    """`cifar-10-batches-py`: train split in 5 equal batches, test batch, batches.meta."""
    n_train, n_test = len(data.train.labels), len(data.test.labels)
    per_batch = n_train // 5
    if n_train % 5 or n_test != per_batch:
        raise ValueError(
            f"CIFAR-10 batches are equal: need n_train = 5 * n_test, got {n_train}, {n_test}"
        )

    def batch(images: np.ndarray, labels: np.ndarray, label: str) -> dict:
        return {
            b"batch_label": label.encode(),
            b"labels": labels.tolist(),
            b"data": to_chw_rows(images),
            b"filenames": [f"{label}_{i}.png".encode() for i in range(len(labels))],
        }

    members: Members = {}
    for i in range(5):
        part = slice(i * per_batch, (i + 1) * per_batch)
        members[f"{CIFAR10_PYTHON}/data_batch_{i + 1}"] = batch(
            data.train.images[part], data.train.labels[part], f"training batch {i + 1} of 5"
        )
    members[f"{CIFAR10_PYTHON}/test_batch"] = batch(
        data.test.images, data.test.labels, "testing batch 1 of 1"
    )
    members[f"{CIFAR10_PYTHON}/batches.meta"] = {
        b"num_cases_per_batch": per_batch,
        b"label_names": _names(data.class_names),
        b"num_vis": 3072,
    }
    return members


def cifar100_binary_records(split: FakeSplit) -> bytes:
    """3,074-byte records: coarse label, fine label, 3,072 CHW pixels."""
    records = np.concatenate(
        [
            split.coarse_labels.astype(np.uint8)[:, None],
            split.labels.astype(np.uint8)[:, None],
            to_chw_rows(split.images),
        ],
        axis=1,
    )
    return records.tobytes()


def cifar100_binary_members(data: FakeCifar) -> Members:
    """`cifar-100-binary/{train,test}.bin` and the label-name files, as TFDS downloads it."""
    return {
        f"{CIFAR100_BINARY}/train.bin": cifar100_binary_records(data.train),
        f"{CIFAR100_BINARY}/test.bin": cifar100_binary_records(data.test),
        f"{CIFAR100_BINARY}/fine_label_names.txt": "\n".join(data.class_names).encode() + b"\n",
        f"{CIFAR100_BINARY}/coarse_label_names.txt": "\n".join(data.coarse_class_names).encode()
        + b"\n",
    }


def _member_bytes(value: bytes | dict) -> bytes:
    return value if isinstance(value, bytes) else pickle.dumps(value, protocol=2)


def write_tar_gz(path: str | Path, members: Members) -> Path:
    """Write members (folders first, as `tar czf` does) into a gzip-compressed tar."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for folder in sorted({str(Path(name).parent) for name in members} - {"."}):
            info = tarfile.TarInfo(folder)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for name, value in members.items():
            payload = _member_bytes(value)
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(payload))
    return path


def write_folder(root: str | Path, members: Members) -> Path:
    """Write members as files under `root`, as extracting the archive there would."""
    root = Path(root)
    for name, value in members.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(_member_bytes(value))
    return root


def make_cifar100_python_archive(
    path: str | Path, n_train: int = 40, n_test: int = 20, *, seed: int = 0
) -> FakeCifar:
    """A `cifar-100-python.tar.gz` of random data at `path`."""
    data = fake_cifar(n_train, n_test, 100, seed=seed)
    write_tar_gz(path, cifar100_python_members(data))
    return data


def make_cifar10_python_archive(
    path: str | Path, n_train: int = 40, n_test: int = 8, *, seed: int = 0
) -> FakeCifar:
    """A `cifar-10-python.tar.gz` of random data at `path` (n_train = 5 * n_test)."""
    data = fake_cifar(n_train, n_test, 10, seed=seed)
    write_tar_gz(path, cifar10_python_members(data))
    return data


def make_cifar100_binary_archive(
    path: str | Path, n_train: int = 40, n_test: int = 20, *, seed: int = 0
) -> FakeCifar:
    """A `cifar-100-binary.tar.gz` (the layout TFDS downloads) of random data at `path`."""
    data = fake_cifar(n_train, n_test, 100, seed=seed)
    write_tar_gz(path, cifar100_binary_members(data))
    return data
