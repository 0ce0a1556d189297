"""Checks and fingerprints of the raw unlabeled images (``imagesUnlabeled``), made before anything is written.

- Complete files: SimpleITK reads a truncated ``.nii.gz`` as zeros after its header, so every compressed file is
  read to its checksum (:func:`nnunet_ext.io_checks.verify_gzip_complete`).
- Geometry: nnU-Net's ``SimpleITKIO`` takes a 4D file for several channels and stops on channels of different
  size or spacing with a bare ``RuntimeError()``; here each channel file must be one 2D/3D single-component image
  and the channels of a case must share size and spacing (checked from the headers only).
- Fingerprints: per source file its name, size, modification time and SHA-256, stored in the manifest. A case
  whose files changed is preprocessed again; the hash is only computed when size or modification time differ
  (or for new cases), so an unchanged dataset is not re-read.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from nnunet_ext.errors import InputError
from nnunet_ext.io_checks import file_sha256, verify_gzip_complete



def source_record(files: Sequence[str]) -> list[dict]:
    """One ``{"file", "size", "mtime_ns", "sha256"}`` entry per channel file (what the manifest stores)."""
    record = []
    for path in files:
        stat = os.stat(path)
        record.append({"file": os.path.basename(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                       "sha256": file_sha256(path)})
    return record


def unchanged_record(record: Sequence[dict] | None, files: Sequence[str]) -> list[dict] | None:
    """``record`` (modification times refreshed) if ``files`` still have the recorded names and contents, else None.

    Args:
        record: the case's entry of a previous manifest, or None.
        files: the case's current channel files, in channel order.
    """
    if not record or [entry.get("file") for entry in record] != [os.path.basename(f) for f in files]:
        return None
    current = []
    for entry, path in zip(record, files):
        stat = os.stat(path)
        if stat.st_size != entry.get("size"):
            return None
        if stat.st_mtime_ns != entry.get("mtime_ns"):  # touched or rewritten: compare the contents
            if file_sha256(path) != entry.get("sha256"):
                return None
            entry = {**entry, "mtime_ns": stat.st_mtime_ns}
        current.append(dict(entry))
    return current


def _geometry_problem(case: str, files: Sequence[str], simpleitk_reads: bool) -> str | None:
    """Header-only check of one case's channel files; None when fine or when SimpleITK does not read the ending.

    ``simpleitk_reads``: the plans read images with SimpleITK, so a header it cannot read is a problem; with
    another reader (nibabel accepts e.g. non-orthonormal directions that SimpleITK refuses) such a case is left
    to that reader.
    """
    import SimpleITK as sitk
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    if not all(f.lower().endswith(tuple(SimpleITKIO.supported_file_endings)) for f in files):
        return None  # other readers (png, tif): left to nnU-Net's reader
    headers = []
    for path in files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        try:
            reader.ReadImageInformation()
        except RuntimeError as e:
            if not simpleitk_reads:
                return None
            return f"case '{case}': cannot read {os.path.basename(path)} ({str(e).strip().splitlines()[-1]})"
        headers.append((os.path.basename(path), reader.GetDimension(), reader.GetNumberOfComponents(),
                        tuple(reader.GetSize()), tuple(reader.GetSpacing())))
    for name, dimension, components, size, _ in headers:
        if dimension not in (2, 3) or components != 1:
            return (f"case '{case}': {name} is a {dimension}D image with {components} component(s) per voxel "
                    f"(size {size}); expected one 2D or 3D single-component image per channel file "
                    f"(split 4D/multi-component images into <case>_0000, <case>_0001, ...)")
    sizes = {name: size for name, _, _, size, _ in headers}
    if len(set(sizes.values())) > 1:
        return f"case '{case}': channel files differ in size (x, y, z): {sizes}; all channels must share one grid"
    spacings = {name: spacing for name, *_, spacing in headers}
    if not np.allclose(headers[0][4], list(spacings.values())):
        return f"case '{case}': channel files differ in spacing: {spacings}; all channels must share one grid"
    return None


def find_source_problems(cases: Mapping[str, Sequence[str]], image_reader_writer: str | None = None) -> list[str]:
    """Every problem of the given cases' files (incomplete ``.gz``, 4D/multi-component images, channel grids).

    Args:
        cases: case -> channel files.
        image_reader_writer: the plans' ``image_reader_writer`` (e.g. ``SimpleITKIO``); None = SimpleITK.

    Returns:
        One line per problem, naming the case and file (empty when all is fine).
    """
    problems = []
    for case, files in cases.items():
        try:
            for path in files:
                verify_gzip_complete(path)
        except InputError as e:
            problems.append(f"case '{case}': {e}")
            continue
        problem = _geometry_problem(case, files, image_reader_writer in (None, "SimpleITKIO"))
        if problem:
            problems.append(problem)
    return problems
