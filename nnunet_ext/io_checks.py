"""Checks of input files that their readers do not make, and their content hash.

SimpleITK (and nibabel) read a truncated ``.nii.gz`` without complaint once the header is complete: the missing
voxels come back as zeros. Python's :mod:`gzip` does check the stream end (the CRC-32 and length trailer), so
reading a compressed file to its end once, in chunks, tells whether it is complete.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import zlib

from nnunet_ext.errors import InputError

_CHUNK = 1 << 20  # decompressed bytes per read: constant memory for any file size


def verify_gzip_complete(path: str | os.PathLike, error: type[InputError] = InputError) -> None:
    """Raise ``error`` naming ``path`` unless it is a complete gzip stream (trailer present, checksum right).

    Streams the file in chunks (nothing is kept in memory). Files whose name does not end in ``.gz`` are
    accepted unread.

    Args:
        path: the file to check.
        error: the :class:`~nnunet_ext.errors.InputError` subclass to raise (e.g. ``ConversionError``).

    Raises:
        error: the file is truncated, corrupt or not gzip-compressed although its name ends in ``.gz``.
    """
    if not os.fspath(path).lower().endswith(".gz"):
        return
    if os.path.getsize(path) == 0:  # gzip reads an empty file as an empty stream
        raise error(f"{os.fspath(path)}: the file is empty; replace it with a complete copy")
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(_CHUNK):
                pass
    except EOFError:
        raise error(f"{os.fspath(path)}: the gzip stream ends early (truncated file, e.g. an interrupted copy or "
                    f"download); replace it with a complete copy") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise error(f"{os.fspath(path)}: not a valid gzip file ({e}); replace it with a complete, uncorrupted "
                    f"copy") from None


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in chunks (the content fingerprint of provenance records, unlabeled
    manifests and configured CFCML tables)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
