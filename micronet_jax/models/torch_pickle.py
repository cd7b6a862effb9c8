"""Read `torch.save` checkpoints with pickle + numpy only (no torch import, no arbitrary code).

The original's released weights are legacy (pre-1.6, non-zip) pickles of a `state_dict`;
newer files are zip archives. Both are read here so torch never becomes a dependency. The
unpickler is restricted: a checkpoint can build dicts, lists, plain values and tensors, and
nothing else, so loading an untrusted file cannot run code.

Legacy layout: five pickles in a row (magic number, protocol version, sys info, the object
itself, the list of storage keys), then every storage as an 8-byte element count followed by
its raw bytes. Zip layout: `<prefix>/data.pkl` plus one raw file per storage,
`<prefix>/data/<key>`. In both, tensors refer to storages through pickle persistent ids
`('storage', storage_type, key, location, numel[, view_metadata])`.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from micronet_jax.errors import CheckpointError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
ZIP_SIGNATURE = b"PK\x03\x04"
_LEGACY_MAGIC_PICKLE = pickle.dumps(LEGACY_MAGIC, protocol=2)  # how torch.save starts

# Element types of torch's typed storages. bfloat16 has no numpy type: read as uint16 bits.
_STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "f8",
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "BFloat16Storage": "u2",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "b1",
    "ComplexFloatStorage": "c8",
    "ComplexDoubleStorage": "c16",
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Stand-in for `torch.FloatStorage` & co.: only the element type matters here."""

    name: str

    def dtype(self, byteorder: str) -> np.dtype:
        return np.dtype(_STORAGE_DTYPES[self.name]).newbyteorder(byteorder)


@dataclasses.dataclass
class _Storage:
    """One storage's elements; `data` is filled once its bytes have been read."""

    key: str
    storage_type: _StorageType
    numel: int
    data: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class _StorageSlice:
    """What a persistent id resolves to: a storage, or (legacy views) a window of one."""

    storage: _Storage
    offset: int
    numel: int


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    """A tensor whose storage may not have been read yet (legacy files store data last)."""

    source: _StorageSlice
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *_: Any):
    """`torch._utils._rebuild_tensor(_v2)`: a view (offset, size, stride) into a storage."""
    if not isinstance(storage, _StorageSlice):
        raise CheckpointError("damaged checkpoint: a tensor does not refer to a storage")
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    """`torch._utils._rebuild_parameter`: a Parameter is its data here."""
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a state dict needs; storages go through `storage_for`."""

    def __init__(self, file: BinaryIO, storage_for=None) -> None:
        super().__init__(file, encoding="utf-8")
        self._storage_for = storage_for

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch" and name.endswith("Storage"):
            if name in _STORAGE_DTYPES:
                return _StorageType(name)
            raise CheckpointError(f"unsupported tensor dtype: torch.{name}")
        raise CheckpointError(
            f"refusing to load {module}.{name}: only tensors, dicts, lists and plain values "
            "are read from a checkpoint (save the model's state_dict())"
        )

    def persistent_load(self, pid: Any) -> Any:
        if self._storage_for is None:
            raise CheckpointError("damaged checkpoint: unexpected storage reference")
        return self._storage_for(pid)


class _StorageTable:
    """Storages by key, created the first time a persistent id names them."""

    def __init__(self) -> None:
        self.storages: dict[str, _Storage] = {}

    def __call__(self, pid: Any) -> _StorageSlice:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise CheckpointError(f"damaged checkpoint: unknown persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"unsupported storage type {storage_type!r:.80}")
        key = str(key)
        if int(numel) < 0:
            raise CheckpointError(f"damaged checkpoint: storage {key!r} has a negative size")
        storage = self.storages.setdefault(key, _Storage(key, storage_type, int(numel)))
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return _StorageSlice(storage, 0, storage.numel)
        _view_key, offset, view_numel = view
        return _StorageSlice(storage, int(offset), int(view_numel))


def _materialise(ref: _TensorRef) -> np.ndarray:
    """Copy a tensor out of its storage, refusing views that reach past its end."""
    source = ref.source
    data = source.storage.data
    if data is None:
        raise CheckpointError(f"damaged checkpoint: storage {source.storage.key!r} has no data")
    if len(ref.size) != len(ref.stride) or any(s < 0 for s in ref.stride):
        raise CheckpointError("damaged checkpoint: a tensor has an invalid size or stride")
    start = source.offset + ref.offset
    if any(n == 0 for n in ref.size):
        return np.zeros(ref.size, data.dtype)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
    if ref.offset < 0 or last >= source.numel or source.offset + source.numel > data.size:
        raise CheckpointError(
            f"damaged checkpoint: a tensor reaches past the end of storage {source.storage.key!r}"
        )
    strides = tuple(s * data.itemsize for s in ref.stride)
    view = np.lib.stride_tricks.as_strided(data[start:], ref.size, strides, writeable=False)
    return np.array(view)


def _resolve(obj: Any) -> Any:
    """Replace every tensor reference in a loaded object by a numpy array."""
    if isinstance(obj, _TensorRef):
        return _materialise(obj)
    if isinstance(obj, Mapping):
        return {key: _resolve(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_resolve(value) for value in obj]
    if isinstance(obj, tuple):
        return tuple(_resolve(value) for value in obj)
    return obj


def _storage_array(raw: bytes, storage: _Storage, byteorder: str) -> np.ndarray:
    """Raw bytes -> elements; bfloat16 is widened to float32 (exact)."""
    array = np.frombuffer(raw, storage.storage_type.dtype(byteorder), storage.numel)
    if storage.storage_type.name == "BFloat16Storage":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(array.dtype.newbyteorder("="))


def _load_pickle(file: BinaryIO, storage_for=None) -> Any:
    """One restricted pickle; a cut-off or garbled stream becomes a CheckpointError."""
    try:
        return _RestrictedUnpickler(file, storage_for).load()
    except CheckpointError:
        raise
    except Exception as exc:  # pickle raises many types on garbage
        if isinstance(exc, EOFError) or "truncated" in str(exc):
            raise CheckpointError("truncated checkpoint (the pickle stream ends early)") from exc
        raise CheckpointError(f"damaged checkpoint: {type(exc).__name__}: {exc}") from exc


def _read_legacy(file: BinaryIO) -> Any:
    """The legacy (torch < 1.6 default) format: header pickles, object, keys, storages."""
    head = file.read(len(_LEGACY_MAGIC_PICKLE))
    if len(head) < len(_LEGACY_MAGIC_PICKLE) and _LEGACY_MAGIC_PICKLE.startswith(head):
        raise CheckpointError("truncated checkpoint (it ends inside the magic number)")
    file.seek(0)
    try:
        magic = _RestrictedUnpickler(file).load()
    except Exception as exc:
        raise CheckpointError(
            "not a PyTorch checkpoint (neither a zip archive nor a legacy torch.save pickle)"
        ) from exc
    if magic != LEGACY_MAGIC:
        raise CheckpointError("a pickle, but not a torch.save file (no magic number)")
    protocol = _load_pickle(file)
    if protocol != LEGACY_PROTOCOL:
        raise CheckpointError(f"unsupported torch.save protocol version {protocol!r}")
    sys_info = _load_pickle(file)
    byteorder = "<" if not isinstance(sys_info, dict) or sys_info.get("little_endian", 1) else ">"
    table = _StorageTable()
    obj = _load_pickle(file, table)
    keys = _load_pickle(file)
    if not isinstance(keys, list):
        raise CheckpointError("damaged checkpoint: storage key list missing")
    for key in keys:
        _read_legacy_storage(file, table, str(key), byteorder)
    return _resolve(obj)


def _bytes_left(file: BinaryIO) -> int:
    position = file.tell()
    end = file.seek(0, io.SEEK_END)
    file.seek(position)
    return end - position


def _read_legacy_storage(file: BinaryIO, table: _StorageTable, key: str, byteorder: str) -> None:
    """One storage record: element count (int64) then the elements."""
    storage = table.storages.get(key)
    if storage is None:
        raise CheckpointError(f"damaged checkpoint: data for unknown storage {key!r}")
    header = file.read(8)
    if len(header) < 8:
        raise CheckpointError(f"truncated checkpoint (storage {key!r} is missing)")
    (numel,) = struct.unpack(byteorder + "q", header)
    if numel != storage.numel:
        raise CheckpointError(
            f"damaged checkpoint: storage {key!r} holds {numel} elements, expected {storage.numel}"
        )
    nbytes = numel * storage.storage_type.dtype(byteorder).itemsize
    raw = file.read(min(nbytes, _bytes_left(file)))  # never allocate past the end of the file
    if len(raw) < nbytes:
        raise CheckpointError(
            f"truncated checkpoint (storage {key!r} has {len(raw)} of {nbytes} bytes)"
        )
    storage.data = _storage_array(raw, storage, byteorder)


def _read_zip(path: Path) -> Any:
    """The zip format (torch >= 1.6 default): `<prefix>/data.pkl` and `<prefix>/data/<key>`."""
    try:
        with zipfile.ZipFile(path) as archive:
            return _read_zip_archive(archive)
    except (zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(f"truncated or damaged zip archive: {exc}") from exc


def _read_zip_archive(archive: zipfile.ZipFile) -> Any:
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if not pickles:
        raise CheckpointError("a zip archive, but not a torch.save file (no data.pkl)")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = "<"
    if prefix + "byteorder" in archive.namelist():
        byteorder = "<" if archive.read(prefix + "byteorder").strip() == b"little" else ">"
    table = _StorageTable()
    obj = _load_pickle(io.BytesIO(archive.read(pickles[0])), table)
    for key, storage in table.storages.items():
        member = f"{prefix}data/{key}"
        try:
            raw = archive.read(member)
        except KeyError as exc:
            raise CheckpointError(f"damaged checkpoint: {member} is missing") from exc
        nbytes = storage.numel * storage.storage_type.dtype(byteorder).itemsize
        if len(raw) < nbytes:
            raise CheckpointError(f"damaged checkpoint: {member} has {len(raw)} of {nbytes} bytes")
        storage.data = _storage_array(raw[:nbytes], storage, byteorder)
    return _resolve(obj)


def load_torch_file(path: str | os.PathLike) -> Any:
    """Load any `torch.save` file of plain containers and tensors; tensors become numpy arrays."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with path.open("rb") as file:
            head = file.read(len(ZIP_SIGNATURE))
            if not head:
                raise CheckpointError("the file is empty")
            if head == ZIP_SIGNATURE:
                return _read_zip(path)
            file.seek(0)
            return _read_legacy(file)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a saved `state_dict` (optionally wrapped as {'state_dict': ...}) as numpy arrays."""
    obj = load_torch_file(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise CheckpointError(f"{path}: entry {key!r} is not a tensor (not a state dict)")
    return dict(obj)
