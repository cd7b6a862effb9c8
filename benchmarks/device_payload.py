"""The files the device check needs from ../shared, small enough to travel with the tree.

    python -m benchmarks.device_payload [--shared ../shared] [--out benchmarks/payload]

A device machine receives the working tree and at most 64 MiB of carried files, and the
174 MB CIFAR-10 archive cannot go. This writes, under `--out` (git-ignored):
- `cifar-10-python.tar.gz`: a standard-layout archive of 10,000 real training images (the
  first training batch, in five batches of 2,000) and 2,000 real test images, for the short
  learning run (the project's loader takes it: every batch the size batches.meta states);
- `reference/first_submission.pth`, `reference/final_ee50.pth`: the original's checkpoints;
- `reference/logits.npz`: both checkpoints' main and exit logits on 1,000 of those test images,
  computed here on the CPU, for the parity check on the device;
- `wheels/`: the pure-Python packages a device image may lack (`--wheels`, fetched with pip).
Carry the folder and run there, with no network:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site benchmarks/payload/wheels/*
    PYTHONPATH=/tmp/site:. python3 -m benchmarks.device_check
"""

from __future__ import annotations

import io
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np

from benchmarks.shared_data import SHARED
from micronet_jax.data.cifar import read_batch
from micronet_jax.errors import CommandParser, fail

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "payload"
CHECKPOINTS = ("first_submission", "final_ee50")
# the standard layout's batches are all one size: 5 training batches and the test batch of 2,000
NUM_TRAIN, NUM_TEST, NUM_PARITY = 10_000, 2_000, 1_000
WHEELS = ("ml_collections", "tensorboardX")  # not in a bare JAX image; pure Python
ARCHIVE_FOLDER = "cifar-10-batches-py"


def read_real_cifar10(archive: Path) -> tuple[dict, dict, dict]:
    """The first training batch, the test batch and batches.meta of the real archive."""
    with tarfile.open(archive) as tar:

        def member(name: str) -> dict:
            where = f"{archive}:{ARCHIVE_FOLDER}/{name}"
            return read_batch(tar.extractfile(f"{ARCHIVE_FOLDER}/{name}"), where)

        return member("data_batch_1"), member("test_batch"), member("batches.meta")


def write_subset_archive(path: Path, train: dict, test: dict, meta: dict) -> None:
    """A standard cifar-10-python archive: the training images split over data_batch_1..5."""
    per_batch = NUM_TRAIN // 5
    members = {"batches.meta": {**meta, b"num_cases_per_batch": per_batch}}
    for i in range(5):
        rows = slice(i * per_batch, (i + 1) * per_batch)
        members[f"data_batch_{i + 1}"] = {
            b"data": train[b"data"][rows],
            b"labels": list(train[b"labels"][rows]),
        }
    members["test_batch"] = {
        b"data": test[b"data"][:NUM_TEST],
        b"labels": test[b"labels"][:NUM_TEST],
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            data = pickle.dumps(content)
            info = tarfile.TarInfo(f"{ARCHIVE_FOLDER}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def reference_logits(checkpoints: dict[str, Path], images: np.ndarray) -> dict[str, np.ndarray]:
    """Main and exit logits of each checkpoint on `images`, on this host's CPU."""
    from micronet_jax import load_original, predict

    out = {"images": images}
    for name, path in checkpoints.items():
        loaded = load_original(path)
        main, exits = predict(loaded.model.apply, loaded.variables, images, batch_size=500)
        out[f"{name}/main"], out[f"{name}/exit"] = main, exits
    return out


def download_wheels(names: list[str], folder: Path) -> None:
    """Pure-Python wheels of `names` (without their dependencies: the device image has
    numpy, protobuf and absl)."""
    import subprocess
    import sys

    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    command += ["--only-binary=:all:", "--dest", str(folder), *names]
    subprocess.run(command, check=True)


def main() -> None:
    parser = CommandParser(
        prog="python -m benchmarks.device_payload", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--wheels", nargs="*", default=list(WHEELS), help="packages to carry")
    args = parser.parse_args()
    archive = args.shared / "data" / "cifar-10-python.tar.gz"
    if not archive.exists():
        fail(f"{archive} is missing (the real CIFAR-10 archive)")
    out = args.out
    (out / "reference").mkdir(parents=True, exist_ok=True)
    train, test, meta = read_real_cifar10(archive)
    write_subset_archive(out / "cifar-10-python.tar.gz", train, test, meta)
    checkpoints = {}
    for name in CHECKPOINTS:
        source = args.shared / "reference" / "osi_ai" / name / "trained_model.pth"
        checkpoints[name] = out / "reference" / f"{name}.pth"
        shutil.copyfile(source, checkpoints[name])
    rows = test[b"data"][:NUM_PARITY]
    images = rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    np.savez_compressed(out / "reference" / "logits.npz", **reference_logits(checkpoints, images))
    if args.wheels:
        download_wheels(args.wheels, out / "wheels")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
