"""nnunet_ext.io_checks.verify_gzip_complete: complete streams pass, every kind of damage names the file."""
from __future__ import annotations

import gzip
import hashlib
import os

import pytest

from nnunet_ext.conversion.common import ConversionError
from nnunet_ext.errors import InputError
from nnunet_ext.io_checks import file_sha256, verify_gzip_complete

PAYLOAD = os.urandom(200_000)  # incompressible: the stream is long enough to cut anywhere
COMPLETE = gzip.compress(PAYLOAD)


@pytest.mark.parametrize("name, content", [
    ("complete.nii.gz", COMPLETE),
    ("two_members.nii.gz", COMPLETE + gzip.compress(b"more")),  # concatenated gzip members are valid
    ("uncompressed.nii", PAYLOAD[:100]),  # not .gz: not read
])
def test_complete_files_pass(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    verify_gzip_complete(tmp_path / name)


@pytest.mark.parametrize("content, message", [
    (COMPLETE[:2500], "ends early"),
    (COMPLETE[:-1], "ends early"),  # only the last byte of the trailer missing
    (COMPLETE[:-8] + bytes(8), "CRC check failed"),
    (b"", "is empty"),
    (PAYLOAD[:100], "not a valid gzip file"),  # .gz name, not compressed
])
def test_damaged_files_raise_the_given_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "case_0000.nii.gz"
    path.write_bytes(content)
    with pytest.raises(ConversionError, match=message) as info:
        verify_gzip_complete(path, ConversionError)
    assert str(info.value).startswith(f"{path}: ")
    assert isinstance(info.value, InputError)


def test_file_sha256_known_value_and_chunking(tmp_path):
    small = tmp_path / "abc.txt"
    small.write_bytes(b"abc")
    assert file_sha256(small) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    large = tmp_path / "large.bin"  # more than one 1 MB chunk
    data = bytes(range(256)) * 9000
    large.write_bytes(data)
    assert file_sha256(large) == hashlib.sha256(data).hexdigest()
