"""CIFAR-10 really prepared by TensorFlow Datasets, offline, from the standard archive.

TFDS's own `cifar10` builder downloads the binary-format archive; here its download step
returns a folder of binary-format files written from the first images of each batch of the
python-format archive, and `download_and_prepare` then writes the data set as TFDS always
does, in the file format asked for (TFRecord, its default, or array_record).
"""

from __future__ import annotations

import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np

PER_BATCH = 40  # training images taken from each of the five batches
TEST_IMAGES = 100


def write_binary_batches(archive: Path, folder: Path) -> None:
    """cifar-10-batches-bin/ (data_batch_1..5.bin, test_batch.bin, batches.meta.txt) from
    the first images of each batch of the python-format `archive`."""
    target = folder / "cifar-10-batches-bin"
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:

        def batch(name: str) -> dict:
            return pickle.load(tar.extractfile(f"cifar-10-batches-py/{name}"), encoding="bytes")

        names = [n.decode() for n in batch("batches.meta")[b"label_names"]]
        (target / "batches.meta.txt").write_text("\n".join(names) + "\n")
        for name, count in [(f"data_batch_{i}", PER_BATCH) for i in range(1, 6)] + [
            ("test_batch", TEST_IMAGES)
        ]:
            data = batch(name)
            labels = np.asarray(data[b"labels"][:count], np.uint8)[:, None]
            records = np.concatenate([labels, np.asarray(data[b"data"][:count])], axis=1)
            (target / f"{name}.bin").write_bytes(records.tobytes())


def archive_indices() -> tuple[np.ndarray, int]:
    """The training images the prepared set holds (indices into the archive's 50,000), and
    how many test images (the archive's first)."""
    train = np.concatenate([np.arange(PER_BATCH) + 10_000 * i for i in range(5)])
    return train, TEST_IMAGES


def prepare(archive: Path, data_dir: Path, file_format: str) -> Path:
    """`cifar10` prepared by TFDS in `data_dir` (file_format 'tfrecord' or 'array_record');
    the folder of the prepared version."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.image_classification import cifar

    downloads = data_dir / "downloads"
    write_binary_batches(archive, downloads)

    class LocalDownloads:
        def download_and_extract(self, url: str) -> str:
            del url
            return str(downloads)

    class LocalCifar10(cifar.Cifar10, skip_registration=True):
        name = "cifar10"

        def _split_generators(self, dl_manager):
            return super()._split_generators(LocalDownloads())

    builder = LocalCifar10(data_dir=str(data_dir), file_format=file_format)
    config = tfds.download.DownloadConfig(try_download_gcs=False)
    builder.download_and_prepare(download_config=config)
    shutil.rmtree(downloads)  # what a user's data folder holds afterwards: TFDS's files alone
    return Path(builder.data_dir)
