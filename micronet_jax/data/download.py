"""Fetch a file over HTTP(S) or file:// into place, checksum-verified, never half-written.

The file is streamed into a temporary file next to its destination and renamed only once its
md5 matches, so an interrupted or corrupted download never leaves a file that looks complete.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from micronet_jax.errors import DataError

_CHUNK = 1 << 20


def md5sum(path: str | Path) -> str:
    """The hex md5 of a file, read in chunks so large archives need little memory."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(url: str, dest: str | Path, md5: str | None, *, progress: bool = True) -> Path:
    """Download `url` to `dest`; with `md5` given, a mismatch deletes the file and raises.

    Network and checksum failures raise DataError telling the user how to fetch the file by
    hand, since a missing data set is something they can fix.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            got = _stream(url, out, progress=progress, desc=dest.name)
        if md5 is not None and got != md5.lower():
            raise DataError(
                f"Download of {url} is damaged: md5 {got}, expected {md5}. Nothing was kept; "
                f"try again, or fetch it by hand into {dest}."
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _stream(url: str, out, *, progress: bool, desc: str) -> str:
    """Copy `url` into the open file `out` with a progress bar; return the md5 of the bytes."""
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=desc, disable=not progress
            ) as bar:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise DataError(f"Could not download {url}: {reason}.") from err
    return digest.hexdigest()
