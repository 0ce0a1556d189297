"""nnunet_ext.ssl.unlabeled_sources: source fingerprints and header checks on tiny files (no planning, < 1 s)."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ext.ssl.unlabeled_sources import find_source_problems, source_record, unchanged_record

LATER = 2_000_000_000


def _files(tmp_path: Path) -> list[str]:
    paths = [tmp_path / f"case_{c:04d}.nii" for c in range(2)]
    for c, path in enumerate(paths):
        path.write_bytes(bytes([c]) * 100)
    return [str(p) for p in paths]


def _rewrite_same_size(files: list[str]) -> list[str]:
    Path(files[1]).write_bytes(b"x" * 100)
    os.utime(files[1], ns=(LATER, LATER))
    return files


def _touch(files: list[str]) -> list[str]:
    os.utime(files[0], ns=(LATER, LATER))
    return files


def _grow(files: list[str]) -> list[str]:
    Path(files[0]).write_bytes(bytes(101))
    return files


def _rename(files: list[str]) -> list[str]:
    renamed = files[0].replace("case_", "other_")
    os.rename(files[0], renamed)
    return [renamed, files[1]]


@pytest.mark.parametrize("change, unchanged", [
    (lambda files: files, True),
    (_touch, True),  # same content, new time: kept, time refreshed
    (_rewrite_same_size, False),  # new time and content: the hash decides
    (_grow, False),
    (_rename, False),
])
def test_unchanged_record(tmp_path: Path, change: Callable[[list[str]], list[str]], unchanged: bool) -> None:
    files = _files(tmp_path)
    record = source_record(files)
    files = change(files)
    result = unchanged_record(record, files)
    assert (result is not None) == unchanged
    if unchanged:
        assert [entry["mtime_ns"] for entry in result] == [os.stat(f).st_mtime_ns for f in files]
        assert [entry["sha256"] for entry in result] == [entry["sha256"] for entry in record]
    assert unchanged_record(None, files) is None


def _image(path: Path, shape: tuple[int, ...], spacing: float = 1.0, vector: bool = False) -> str:
    image = sitk.GetImageFromArray(np.zeros(shape, np.float32), isVector=vector)
    image.SetSpacing([spacing] * image.GetDimension())
    sitk.WriteImage(image, str(path))
    return str(path)


def test_source_problems_name_case_and_file(tmp_path: Path) -> None:
    cases = {
        "good": [_image(tmp_path / "good_0000.nii.gz", (4, 5, 6)), _image(tmp_path / "good_0001.nii.gz", (4, 5, 6))],
        "rgb": [_image(tmp_path / "rgb_0000.nii.gz", (4, 5, 3), vector=True)],
        "sizes": [_image(tmp_path / "sizes_0000.nii.gz", (4, 5, 6)), _image(tmp_path / "sizes_0001.nii.gz", (4, 5, 7))],
    }
    broken = tmp_path / "broken_0000.nii.gz"
    broken.write_bytes(b"not an image")
    cases["broken"] = [str(broken)]
    problems = find_source_problems(cases)
    assert len(problems) == 3 and not any("'good'" in p for p in problems)
    assert any(p.startswith("case 'rgb': rgb_0000.nii.gz is a 2D image with 3 component(s)") for p in problems)
    assert any(p.startswith("case 'sizes': channel files differ in size") for p in problems)
    assert any(p.startswith(f"case 'broken': {broken}: not a valid gzip file") for p in problems)
    # an unreadable header is left to a non-SimpleITK reader (nibabel reads files SimpleITK refuses)
    unreadable = tmp_path / "odd_0000.mha"
    unreadable.write_bytes(b"not an image")
    assert find_source_problems({"odd": [str(unreadable)]}, "NibabelIO") == []
    assert "cannot read odd_0000.mha" in find_source_problems({"odd": [str(unreadable)]}, "SimpleITKIO")[0]
