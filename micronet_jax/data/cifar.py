"""CIFAR-100 and CIFAR-10 from the standard archives (or TFDS) as uint8 NHWC numpy arrays.

The training path keeps the whole data set on the device, so loading only has to produce two
arrays per split, once. Archives are read straight from the tar stream in one pass (no
extraction), and every check a damaged or wrong file could fail is made here, with one message
naming the file and what was expected, before anything is compiled.

Layouts read (given as the archive file, a directory holding it, or the extracted folder):
- `cifar-100-python.tar.gz` → `cifar-100-python/{train,test,meta}` (pickles, the official one)
- `cifar-10-python.tar.gz`  → `cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`
- `cifar-100-binary.tar.gz` → `cifar-100-binary/{train,test}.bin` (what TFDS downloads:
  3,074-byte records of coarse label, fine label, 3,072 CHW pixels)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import os
import pickle
import sys
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from micronet_jax.data.download import download_file, md5sum
from micronet_jax.errors import DataError

NAMES = ("cifar100", "cifar10")
SPLITS = ("train", "test")
SOURCES = ("auto", "archive", "tfds")

IMAGE_SHAPE = (32, 32, 3)
_PIXELS = 32 * 32 * 3
_BINARY_RECORD = 2 + _PIXELS
_NUM_COARSE = 20


@dataclass(frozen=True)
class Official:
    """Where the official python-pickle archive of a data set lives, and its md5."""

    title: str
    num_classes: int
    archive: str
    url: str
    md5: str


OFFICIAL = {
    "cifar100": Official(
        "CIFAR-100",
        100,
        "cifar-100-python.tar.gz",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
    ),
    "cifar10": Official(
        "CIFAR-10",
        10,
        "cifar-10-python.tar.gz",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
    ),
}

# Checksums of the official archives, by file name, for verify_checksum=True.
KNOWN_MD5 = {
    **{o.archive: o.md5 for o in OFFICIAL.values()},
    "cifar-100-binary.tar.gz": "03b5dce01913d631647c71ecec9e9cb8",
}


@dataclass(frozen=True)
class CifarSplit:
    """One split: images (N, 32, 32, 3) uint8 and labels (N,) int32 in [0, num_classes).

    For CIFAR-100, `labels` are the 100 fine labels and `coarse_labels` the 20 superclasses.
    """

    images: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    num_classes: int
    coarse_labels: np.ndarray | None = field(default=None, repr=False)
    class_names: tuple[str, ...] | None = field(default=None, repr=False)
    coarse_class_names: tuple[str, ...] | None = field(default=None, repr=False)
    source: str | None = field(default=None, repr=False)  # the file, folder or TFDS it came from

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"CifarSplit({len(self)} images, {self.num_classes} classes)"


@dataclass(frozen=True)
class _Layout:
    """A standard on-disk layout: the member files of each split, and optional metadata."""

    dataset: str
    folder: str
    archive: str
    files: dict[str, tuple[str, ...]]
    meta: tuple[str, ...]


_LAYOUTS = (
    _Layout(
        "cifar100",
        "cifar-100-python",
        "cifar-100-python.tar.gz",
        {"train": ("train",), "test": ("test",)},
        ("meta",),
    ),
    _Layout(
        "cifar100",
        "cifar-100-binary",
        "cifar-100-binary.tar.gz",
        {"train": ("train.bin",), "test": ("test.bin",)},
        ("fine_label_names.txt", "coarse_label_names.txt"),
    ),
    _Layout(
        "cifar10",
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        ("batches.meta",),
    ),
)


def default_data_dir() -> Path:
    """`$MICRONET_DATA`, else `~/.cache/micronet_jax/data`: where archives are looked for."""
    env = os.environ.get("MICRONET_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "micronet_jax" / "data"


def load_cifar(
    name: str,
    data_dir: str | Path | None = None,
    split: str = "train",
    *,
    source: str = "auto",
    download: bool = True,
    verify_checksum: bool = False,
    url: str | None = None,
    md5: str | None = None,
) -> CifarSplit:
    """Load one split of `name` ('cifar100' or 'cifar10').

    `data_dir` is an archive, a directory holding it, or its extracted folder (default:
    `default_data_dir()`). `source='auto'` reads a local archive, else TFDS when it is installed,
    else downloads `url` (the official archive unless given) when `download` is true.
    Downloads are always checked against `md5`; a local archive only with `verify_checksum`
    (re-encoded copies are accepted on their contents).
    """
    return _load(name, data_dir, (split,), source, download, verify_checksum, url, md5)[0]


def load_train_test(
    name: str,
    data_dir: str | Path | None = None,
    *,
    source: str = "auto",
    download: bool = True,
    verify_checksum: bool = False,
    url: str | None = None,
    md5: str | None = None,
) -> tuple[CifarSplit, CifarSplit]:
    """Both splits, reading the archive once. Arguments as for `load_cifar`."""
    train, test = _load(name, data_dir, SPLITS, source, download, verify_checksum, url, md5)
    return train, test


def _load(
    name: str,
    data_dir: str | Path | None,
    splits: tuple[str, ...],
    source: str,
    download: bool,
    verify_checksum: bool,
    url: str | None,
    md5: str | None,
) -> list[CifarSplit]:
    _check_choice("name", name, NAMES)
    _check_choice("source", source, SOURCES)
    for split in splits:
        _check_choice("split", split, SPLITS)
    if source == "tfds":
        return [_load_tfds(name, split, data_dir) for split in splits]
    root = default_data_dir() if data_dir is None else Path(data_dir).expanduser()
    path = _find_local(name, root)
    if path is None and source == "auto" and _tfds_installed() and _tfds_folder(name, data_dir):
        try:
            return [_load_tfds(name, split, data_dir) for split in splits]
        except DataError:
            pass  # not prepared there: carry on with the archive
    if path is None:
        if not download:
            raise DataError(_missing_message(name, root, downloaded=False))
        path = _download(name, root, url, md5)
    elif verify_checksum:
        _verify_local(path, md5)
    return [_from(split, str(path)) for split in _read_splits(name, path, splits)]


def _from(split: CifarSplit, source: str) -> CifarSplit:
    return dataclasses.replace(split, source=source)


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise DataError(f"{what}={value!r} is not supported; expected one of {choices}")


# ---------------------------------------------------------------- finding and fetching


def _find_local(name: str, root: Path) -> Path | None:
    """The archive file or extracted folder to read for `name`, or None when there is none."""
    if root.is_file():
        return root
    if not root.is_dir():
        if root.name.endswith((".tar.gz", ".tgz", ".tar")):
            raise DataError(f"{root} does not exist. {_expected_text(name)}")
        return None
    if any((root / f).is_file() for layout in _LAYOUTS for f in _layout_files(layout)):
        return root  # the extracted folder itself
    for layout in _LAYOUTS:
        if layout.dataset != name:
            continue
        for candidate in (root / layout.folder, root / layout.archive):
            if candidate.exists():
                return candidate
    return None


def _layout_files(layout: _Layout) -> tuple[str, ...]:
    return tuple(f for files in layout.files.values() for f in files)


def _expected_text(name: str) -> str:
    official = OFFICIAL[name]
    options = "; or ".join(
        f"{layout.archive} or its extracted folder {layout.folder}/ "
        f"({', '.join(_layout_files(layout))})"
        for layout in _LAYOUTS
        if layout.dataset == name
    )
    return f"Expected {options}. The official archive is {official.url}"


def _missing_message(name: str, root: Path, *, downloaded: bool) -> str:
    official = OFFICIAL[name]
    fix = "put it" if downloaded else "download it with download=True, or put it"
    return (
        f"No {official.title} data in {root}. {_expected_text(name)}: {fix} in {root}, "
        f"or pass its path: --config.data.dir=PATH on the command line (data_dir=PATH in "
        f"Python); or a data set prepared by TFDS (tfds.builder({name!r})."
        "download_and_prepare(), in ~/tensorflow_datasets or that --config.data.dir)."
    )


def _tfds_folder(name: str, data_dir: str | Path | None) -> bool:
    """Whether TFDS could have prepared `name` there (its folder exists): only then is TFDS
    asked, since asking about a folder that is not there makes it log a warning."""
    base = (
        os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets") if data_dir is None else data_dir
    )
    return (Path(base).expanduser() / name).is_dir()


def _download(name: str, root: Path, url: str | None, md5: str | None) -> Path:
    """Fetch the official archive (or `url`) into `root`, checksum-verified."""
    official = OFFICIAL[name]
    try:
        return download_file(url or official.url, root / official.archive, md5 or official.md5)
    except DataError as err:
        raise DataError(f"{err} {_missing_message(name, root, downloaded=True)}") from err


def _verify_local(path: Path, md5: str | None) -> None:
    """Compare a local archive with the known (or given) md5: for users who want the original."""
    if path.is_dir():
        raise DataError(f"verify_checksum=True needs an archive file; {path} is a folder")
    expected = md5 or KNOWN_MD5.get(path.name)
    if expected is None:
        raise DataError(
            f"verify_checksum=True: no known checksum for {path.name} (known: "
            f"{', '.join(KNOWN_MD5)}); pass md5=..."
        )
    got = md5sum(path)
    if got != expected.lower():
        raise DataError(f"{path} has md5 {got}, expected {expected}: not the official archive")


# ---------------------------------------------------------------- reading members


def _read_splits(name: str, path: Path, splits: tuple[str, ...]) -> list[CifarSplit]:
    """Read every wanted member of `path` once, find its layout, build each split."""
    wanted = {
        f
        for layout in _LAYOUTS
        if layout.dataset == name
        for f in layout.meta + tuple(m for s in splits for m in layout.files[s])
    }
    folders, contents = _read_tree(path, wanted) if path.is_dir() else _read_tar(path, wanted)
    layout, folder = _match_layout(name, path, folders, splits)

    def member(base: str) -> Any:
        return contents.get(f"{folder}/{base}" if folder else base)

    build = _BUILDERS[layout.folder]
    return [build(path, layout, split, member) for split in splits]


def _read_tar(path: Path, wanted: set[str]) -> tuple[dict[str, set[str]], dict[str, Any]]:
    """One pass over a (compressed) tar: names of all files, parsed contents of wanted ones."""
    folders: dict[str, set[str]] = {}
    contents: dict[str, Any] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                member = PurePosixPath(info.name)
                parent = "" if str(member.parent) == "." else str(member.parent)
                folders.setdefault(parent, set()).add(member.name)
                if member.name in wanted:
                    where = f"{path}:{info.name}"
                    contents[str(member)] = _parse(tar.extractfile(info), where)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise DataError(
            f"{path} is truncated or corrupt ({err}); expected a readable tar archive such as "
            f"the standard CIFAR .tar.gz: delete it and download it again."
        ) from err
    return folders, contents


def _read_tree(path: Path, wanted: set[str]) -> tuple[dict[str, set[str]], dict[str, Any]]:
    """The same for an extracted folder."""
    names = {p.name for p in path.iterdir() if p.is_file()}
    contents = {}
    for base in names & wanted:
        with open(path / base, "rb") as f:
            contents[base] = _parse(f, str(path / base))
    return {"": names}, contents


def _parse(f: io.BufferedIOBase, where: str) -> Any:
    """Bytes for `.bin` records, lines for `.txt` label names, else an unpickled batch dict."""
    if where.endswith(".bin"):
        return f.read()
    if where.endswith(".txt"):
        text = f.read().decode("utf-8", errors="replace")
        return tuple(line.strip() for line in text.splitlines() if line.strip())
    return read_batch(f, where)


class _BatchUnpickler(pickle.Unpickler):
    """Only what CIFAR batches contain (dicts, lists, numpy arrays), so a hostile pickle
    cannot run code."""

    _ALLOWED = {
        ("_codecs", "encode"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy.core.numeric", "_frombuffer"),
    }

    def __init__(self, f: io.BufferedIOBase, where: str) -> None:
        super().__init__(f, encoding="bytes")
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise DataError(
                f"{self.where} refers to {module}.{name}, which a CIFAR batch never holds: "
                f"not unpickling it"
            )
        return super().find_class(module, name)


def read_batch(f: io.BufferedIOBase, where: str) -> dict:
    """One pickled CIFAR batch (a dict of bytes keys), unpickled with only the types a CIFAR
    batch holds allowed; anything else is a DataError naming `where`."""
    try:
        batch = _BatchUnpickler(f, where).load()
    except DataError:
        raise
    except Exception as err:  # a damaged pickle can fail in many ways; all mean "corrupt"
        raise DataError(
            f"{where} is truncated or corrupt ({type(err).__name__}: {err}); expected a "
            f"pickled CIFAR batch (a dict with b'data' and labels)"
        ) from err
    if not isinstance(batch, dict):
        raise DataError(f"{where} holds a {type(batch).__name__}, expected a CIFAR batch dict")
    return batch


def _match_layout(
    name: str, path: Path, folders: dict[str, set[str]], splits: tuple[str, ...]
) -> tuple[_Layout, str]:
    """The layout (and folder inside the archive) holding the splits; the wrong data set or
    an unknown layout is an error."""
    found = [
        (layout, folder)
        for layout in _LAYOUTS
        for folder in sorted(folders)
        if all(set(layout.files[s]) <= folders[folder] for s in splits)
    ]
    for layout, folder in found:
        if layout.dataset == name:
            return layout, folder
    if found:
        other = OFFICIAL[found[0][0].dataset].title
        raise DataError(
            f"{path} is {other} ({found[0][0].folder}), but {OFFICIAL[name].title} was asked "
            f"for. {_expected_text(name)}"
        )
    seen = sorted(f"{folder}/{n}" if folder else n for folder, ns in folders.items() for n in ns)
    shown = ", ".join(seen[:8]) + (", ..." if len(seen) > 8 else "") if seen else "no files"
    raise DataError(
        f"{path} does not hold the {OFFICIAL[name].title} {'/'.join(splits)} files (found "
        f"{shown}). {_expected_text(name)}"
    )


# ---------------------------------------------------------------- building and checking


def _build_cifar100_python(path: Path, layout: _Layout, split: str, member) -> CifarSplit:
    batch = member(split)
    where = f"{path} ({layout.folder}/{split})"
    if b"fine_labels" not in batch and b"labels" in batch:
        raise DataError(f"{where} has CIFAR-10 style b'labels', expected CIFAR-100 b'fine_labels'")
    rows = _rows(batch, where)
    meta = member("meta") or {}
    return CifarSplit(
        images=_to_nhwc([rows]),
        labels=_labels(batch.get(b"fine_labels"), len(rows), 100, f"{where} b'fine_labels'"),
        num_classes=100,
        coarse_labels=_labels(
            batch.get(b"coarse_labels"), len(rows), _NUM_COARSE, f"{where} b'coarse_labels'"
        ),
        class_names=_names(meta.get(b"fine_label_names"), 100, f"{path} meta"),
        coarse_class_names=_names(meta.get(b"coarse_label_names"), _NUM_COARSE, f"{path} meta"),
    )


def _build_cifar10_python(path: Path, layout: _Layout, split: str, member) -> CifarSplit:
    meta = member("batches.meta") or {}
    per_batch = meta.get(b"num_cases_per_batch")
    all_rows, all_labels = [], []
    for base in layout.files[split]:
        batch = member(base)
        where = f"{path} ({layout.folder}/{base})"
        if b"labels" not in batch and b"fine_labels" in batch:
            raise DataError(f"{where} has CIFAR-100 style b'fine_labels', expected CIFAR-10")
        rows = _rows(batch, where)
        if per_batch is not None and len(rows) != per_batch:
            raise DataError(
                f"{where} has {len(rows)} images, but batches.meta says {per_batch} per batch: "
                f"the archive is incomplete or mixed"
            )
        all_rows.append(rows)
        all_labels.append(_labels(batch.get(b"labels"), len(rows), 10, f"{where} b'labels'"))
    return CifarSplit(
        images=_to_nhwc(all_rows),
        labels=np.concatenate(all_labels),
        num_classes=10,
        class_names=_names(meta.get(b"label_names"), 10, f"{path} batches.meta"),
    )


def _build_cifar100_binary(path: Path, layout: _Layout, split: str, member) -> CifarSplit:
    where = f"{path} ({layout.folder}/{split}.bin)"
    raw = np.frombuffer(member(f"{split}.bin"), dtype=np.uint8)
    if raw.size == 0 or raw.size % _BINARY_RECORD:
        raise DataError(
            f"{where} is {raw.size} bytes, expected a whole number of {_BINARY_RECORD}-byte "
            f"records (coarse label, fine label, {_PIXELS} pixels): truncated?"
        )
    records = raw.reshape(-1, _BINARY_RECORD)
    n = len(records)
    return CifarSplit(
        images=_to_nhwc([records[:, 2:]]),
        labels=_labels(records[:, 1], n, 100, f"{where} fine labels"),
        num_classes=100,
        coarse_labels=_labels(records[:, 0], n, _NUM_COARSE, f"{where} coarse labels"),
        class_names=_names(member("fine_label_names.txt"), 100, f"{path} fine_label_names.txt"),
        coarse_class_names=_names(
            member("coarse_label_names.txt"), _NUM_COARSE, f"{path} coarse_label_names.txt"
        ),
    )


_BUILDERS = {
    "cifar-100-python": _build_cifar100_python,
    "cifar-10-batches-py": _build_cifar10_python,
    "cifar-100-binary": _build_cifar100_binary,
}


def _rows(batch: dict, where: str) -> np.ndarray:
    """The batch's pixels as (N, 3072) uint8 rows, CHW order."""
    data = batch.get(b"data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim not in (1, 2):
        kind = type(data).__name__ if not isinstance(data, np.ndarray) else data.dtype
        raise DataError(f"{where} b'data' is {kind}, expected a uint8 array of N×{_PIXELS}")
    if data.size == 0 or data.size % _PIXELS or (data.ndim == 2 and data.shape[1] != _PIXELS):
        raise DataError(
            f"{where} b'data' has shape {data.shape}, expected N×{_PIXELS} (32×32×3 pixels)"
        )
    return data.reshape(-1, _PIXELS)


def _to_nhwc(rows: list[np.ndarray]) -> np.ndarray:
    """CHW rows → one C-contiguous (N, 32, 32, 3) array, in a single copy."""
    out = np.empty((sum(len(r) for r in rows), *IMAGE_SHAPE), dtype=np.uint8)
    start = 0
    for r in rows:
        out[start : start + len(r)] = r.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        start += len(r)
    return out


def _labels(values: Any, n: int, num_classes: int, where: str) -> np.ndarray:
    """Labels as int32, checked against the image count and [0, num_classes)."""
    if values is None:
        raise DataError(f"{where} is missing")
    labels = np.asarray(values)
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise DataError(f"{where} is {labels.dtype} of shape {labels.shape}, expected N integers")
    if len(labels) != n:
        raise DataError(f"{where} has {len(labels)} labels for {n} images; expected one each")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise DataError(
            f"{where} range {low}..{high}, expected 0..{num_classes - 1}: wrong data set "
            f"or a corrupt archive"
        )
    return labels.astype(np.int32)


def _names(values: Any, expected: int, where: str) -> tuple[str, ...] | None:
    """Class names from metadata when present; their number tells data sets apart."""
    if values is None:
        return None
    names = tuple(v.decode() if isinstance(v, bytes) else str(v) for v in values)
    if len(names) != expected:
        raise DataError(
            f"{where} lists {len(names)} class names, expected {expected}: wrong data set?"
        )
    return names


# ---------------------------------------------------------------- TFDS


def _tfds_installed() -> bool:
    try:
        return importlib.util.find_spec("tensorflow_datasets") is not None
    except ValueError:  # imported without a spec, or blocked by a None in sys.modules
        return sys.modules.get("tensorflow_datasets") is not None


def _tfds_module():
    # TFDS may import TensorFlow (a reader here), whose C++ start-up notices would land in
    # the run's stderr: its oneDNN notice goes only with oneDNN off, which reading data
    # does not miss
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise DataError(
            "source='tfds' needs tensorflow_datasets, which is not installed: "
            "pip install 'micronet_jax[tfds]', or use source='archive' with the standard "
            f"archive ({OFFICIAL['cifar100'].url})"
        ) from err
    return tfds


RANDOM_ACCESS_FORMATS = ("array_record", "parquet")


def _load_tfds(name: str, split: str, data_dir: str | Path | None) -> CifarSplit:
    """A prepared TFDS data set, in the format it was prepared in: array_record or parquet
    through its random-access data source (no TensorFlow needed), TFRecord (what
    `download_and_prepare()` writes by default) through TFDS's own reader, which needs
    TensorFlow. The split's `source` names TFDS, the format and the folder."""
    tfds = _tfds_module()
    builder = _tfds_builder(tfds, name, data_dir)
    file_format = _file_format(builder)
    where = f"TFDS {name} {split}"
    try:
        if file_format in RANDOM_ACCESS_FORMATS:
            records = _random_access_records(tfds, name, split, data_dir)
        else:
            records = _tfrecord_records(tfds, builder, name, split, file_format)
    except DataError:
        raise
    except Exception as err:  # TFDS raises many types for a damaged or partial data set
        raise DataError(f"{where}: TFDS could not read it ({type(err).__name__}: {err})") from err
    if "id" in records:  # TFDS stores records in a hashed order; its ids keep the archive's
        order = np.argsort(records["id"], kind="stable")
        records = {k: np.asarray(v)[order] for k, v in records.items()}
    features = builder.info.features
    result = _tfds_split(name, records, features, where)
    return dataclasses.replace(result, source=f"TFDS ({file_format}) {builder.data_dir}")


def _tfds_builder(tfds: Any, name: str, data_dir: str | Path | None) -> Any:
    """The builder of a prepared data set, or a DataError saying how to prepare one."""
    try:
        builder = tfds.builder(name, data_dir=None if data_dir is None else str(data_dir))
        prepared = builder.is_prepared()
    except Exception as err:  # TFDS raises many types for "not there"
        prepared, builder = False, None
        reason = f" ({type(err).__name__}: {err})"
    else:
        reason = ""
    if not prepared:
        place = f" in {data_dir}" if data_dir is not None else ""
        raise DataError(
            f"TFDS has no prepared {name}{place}{reason}; prepare it with "
            f"tfds.builder({name!r}).download_and_prepare(), or use source='archive'"
        )
    return builder


def _file_format(builder: Any) -> str:
    file_format = builder.info.file_format
    return str(getattr(file_format, "value", file_format) or "tfrecord").lower()


def _random_access_records(tfds: Any, name: str, split: str, data_dir) -> dict[str, np.ndarray]:
    source = tfds.data_source(name, split=split, data_dir=data_dir)
    records = source.__getitems__(list(range(len(source))))
    keys = ("image", "label", "coarse_label") if name == "cifar100" else ("image", "label")
    arrays = {k: np.stack([np.asarray(r[k]) for r in records]) for k in keys}
    if records and "id" in records[0]:
        arrays["id"] = np.asarray([_text(r["id"]) for r in records])
    return arrays


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _tfrecord_records(tfds: Any, builder: Any, name: str, split: str, file_format: str):
    """The split as arrays through TFDS's TFRecord reader (`as_numpy` of `as_dataset`)."""
    if importlib.util.find_spec("tensorflow") is None:
        raise DataError(
            f"TFDS {name} in {builder.data_dir} was prepared as {file_format}, which TFDS "
            "reads with TensorFlow: install it (pip install tensorflow), or prepare the data "
            f"set again with tfds.builder({name!r}, file_format='array_record')"
            ".download_and_prepare(), which reads without TensorFlow"
        )
    dataset = builder.as_dataset(split=split, batch_size=-1)
    arrays = {k: np.asarray(v) for k, v in tfds.as_numpy(dataset).items()}
    if "id" in arrays:
        arrays["id"] = np.asarray([_text(i) for i in arrays["id"]])
    return arrays


def _tfds_split(name: str, records: dict, features: Any, where: str) -> CifarSplit:
    num_classes = OFFICIAL[name].num_classes
    images = np.asarray(records["image"], dtype=np.uint8)
    n = len(images)
    if images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{where} images have shape {images.shape[1:]}, expected {IMAGE_SHAPE}")
    coarse = coarse_names = None
    if name == "cifar100":
        coarse = _labels(list(records["coarse_label"]), n, _NUM_COARSE, f"{where} coarse labels")
        coarse_names = _names(features["coarse_label"].names, _NUM_COARSE, f"{where} names")
    return CifarSplit(
        images=images,
        labels=_labels(list(records["label"]), n, num_classes, f"{where} labels"),
        num_classes=num_classes,
        coarse_labels=coarse,
        class_names=_names(features["label"].names, num_classes, f"{where} label names"),
        coarse_class_names=coarse_names,
    )
