"""Writing 3D (or 2D medical) segmentation cases: geometry checks, image copies, label conversion.

Images that are files already in the output format are copied byte for byte (no re-encoding, intensities and
header untouched); other images are re-written through SimpleITK. Labels are always read, checked and re-written
as unsigned integers with the label file's own geometry. Every case is checked before it is written: the same
grid (size and spacing) for all channels and for the label, single-component images, label values, and
compressed files (``.gz``) complete to their checksum.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunet_ext.conversion.common import ConversionError, DatasetWriter, LabelConverter, file_ending
from nnunet_ext.conversion.splits import Split
from nnunet_ext.io_checks import verify_gzip_complete

# (images [one per channel], label or None) built in memory, e.g. from an HDF5 file.
VolumeLoader = Callable[[bool], tuple[list[sitk.Image], "sitk.Image | None"]]


@dataclass
class VolumeCase:
    """One source case: either files (``image_files`` [+ ``label_file``]) or an in-memory ``loader``.

    ``loader(with_label)`` returns the channel images and, when asked, the label image. ``where`` names the case's
    origin in error messages.
    """

    case_id: str
    where: str
    image_files: Sequence[Path] = ()
    label_file: Path | None = None
    loader: VolumeLoader | None = None
    has_label: bool = field(default=False)

    def __post_init__(self) -> None:
        if self.loader is None and not self.image_files:
            raise ValueError(f"case {self.case_id}: needs image files or a loader")
        if self.loader is None:
            self.has_label = self.label_file is not None


def _grid(image: sitk.Image) -> tuple[tuple[int, ...], tuple[float, ...]]:
    return tuple(image.GetSize()), tuple(image.GetSpacing())


def _header(path: Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise ConversionError(f"{path}: cannot read the image ({str(e).strip().splitlines()[-1]})") from None
    return reader


def _check_same_grid(reference: tuple, reference_name: str, other: tuple, other_name: str, case: str,
                     what: str) -> None:
    (size_a, spacing_a), (size_b, spacing_b) = reference, other
    if size_a != size_b:
        raise ConversionError(f"case {case}: {what}: {other_name} has size {size_b} (x, y, z) but "
                              f"{reference_name} has {size_a}")
    if not np.allclose(spacing_a, spacing_b, rtol=1e-4, atol=1e-5):
        raise ConversionError(f"case {case}: {what}: {other_name} has spacing {spacing_b} but {reference_name} "
                              f"has {spacing_a}")


def write_volume_case(case: VolumeCase, part: str, writer: DatasetWriter, labels: LabelConverter,
                      num_channels: int) -> None:
    """Check one case and write its images (and label for ``labeled``/``test``) into ``writer``."""
    needs_label = part in ("labeled", "test")
    if needs_label and not case.has_label:
        raise ConversionError(f"case {case.case_id} ({case.where}) is assigned to {part} but has no label")
    if case.loader is not None:
        images, label = case.loader(needs_label)
        image_names = [f"{case.where}:image[{c}]" for c in range(len(images))]
    else:
        images, label = None, None
        image_names = [str(p) for p in case.image_files]
    count = len(images) if images is not None else len(case.image_files)
    if count != num_channels:
        raise ConversionError(f"case {case.case_id}: {count} image channels, expected {num_channels}")

    if images is None:
        # SimpleITK reads a truncated .gz as zeros after the header: check the whole stream first
        for path in [*case.image_files, *([case.label_file] if needs_label else [])]:
            verify_gzip_complete(path, ConversionError)
        headers = [_header(p) for p in case.image_files]
        grids = [(tuple(h.GetSize()), tuple(h.GetSpacing())) for h in headers]
        components = [h.GetNumberOfComponents() for h in headers]
        dims = [h.GetDimension() for h in headers]
    else:
        grids = [_grid(im) for im in images]
        components = [im.GetNumberOfComponentsPerPixel() for im in images]
        dims = [im.GetDimension() for im in images]
    for name, n_components, dim in zip(image_names, components, dims):
        if n_components != 1:
            raise ConversionError(f"case {case.case_id}: {name} has {n_components} components per voxel; expected "
                                  f"single-channel images (one file per modality)")
        if dim not in (2, 3):
            raise ConversionError(f"case {case.case_id}: {name} is {dim}D; expected a 2D or 3D image")
    for name, grid in zip(image_names[1:], grids[1:]):
        _check_same_grid(grids[0], image_names[0], grid, name, case.case_id, "modalities differ")

    if needs_label:
        if label is None:
            label = sitk.ReadImage(str(case.label_file))
            label_name = str(case.label_file)
        else:
            label_name = f"{case.where}:label"
        if label.GetNumberOfComponentsPerPixel() != 1:
            raise ConversionError(f"case {case.case_id}: label {label_name} has several components per voxel")
        _check_same_grid(grids[0], image_names[0], _grid(label), label_name, case.case_id,
                         "image and label differ")
        converted = sitk.GetImageFromArray(labels.convert(sitk.GetArrayFromImage(label), label_name))
        converted.CopyInformation(label)
        sitk.WriteImage(converted, str(writer.label_path(part, case.case_id)), useCompression=True)

    for channel in range(num_channels):
        target = writer.image_path(part, case.case_id, channel)
        if images is None:
            source = Path(case.image_files[channel])
            if file_ending(source) == writer.file_ending:
                shutil.copyfile(source, target)  # byte-for-byte: no re-encoding needed
            else:
                sitk.WriteImage(sitk.ReadImage(str(source)), str(target), useCompression=True)
        else:
            sitk.WriteImage(images[channel], str(target), useCompression=True)


def write_volume_dataset(cases: Mapping[str, VolumeCase], split: Split, writer: DatasetWriter,
                         labels: LabelConverter, channel_names: Sequence[str], name: str,
                         description: str = "", extra_json: Mapping | None = None) -> Path:
    """Write every case of ``split`` (labeled, unlabeled, test, unlabeled-only) and finish the dataset."""
    for part in ("labeled", "test", "unlabeled", "unlabeled_only"):
        for case_id in getattr(split, part):
            write_volume_case(cases[case_id], part, writer, labels, len(channel_names))
    dataset_json = {"name": name, "description": description,
                    "channel_names": {str(i): c for i, c in enumerate(channel_names)},
                    **labels.dataset_json_entries(), **(extra_json or {})}
    return writer.finish(dataset_json, split)


def check_channel_names(channel_names: Sequence[str]) -> list[str]:
    names = [str(c) for c in channel_names]
    if not names:
        raise ConversionError("at least one modality/channel is needed")
    if len(set(names)) != len(names):
        raise ConversionError(f"channel names must be unique, got {names}")
    return names


def convert_volume_cases(cases: Mapping[str, VolumeCase], *, raw_root: Path, dataset_id: int, name: str,
                         channel_names: Sequence[str], sources: Sequence[Path], labels: Mapping[str, int] | None,
                         label_map: Mapping[int, int] | None, labeled: str | None, test: str | None, seed: int,
                         split_file: str | Path | None, overwrite: bool, fixed_test: Sequence[str] | None = None,
                         fixed_train: Sequence[str] | None = None, description: str = "",
                         split_info: Mapping | None = None, labeled_order: str = "random",
                         groups: Mapping[str, str] | None = None, group_name: str = "group",
                         regions: Mapping[str, int | Sequence[int]] | None = None) -> Path:
    """Split ``cases`` (cases without label go to ``imagesUnlabeled``) and write the dataset.

    ``labeled_order``, ``groups`` and ``group_name`` are passed to :func:`~nnunet_ext.conversion.splits.make_split`.
    ``regions`` (name -> label values) makes a region-based dataset (:mod:`~nnunet_ext.conversion.regions`); the
    label files then keep their values (after ``label_map``).
    """
    from nnunet_ext.conversion.regions import RegionLabelConverter, plan_regions
    from nnunet_ext.conversion.splits import load_split_file, make_split

    if not cases:
        raise ConversionError(f"no cases found in {', '.join(map(str, sources))}")
    channel_names = check_channel_names(channel_names)
    if regions is not None and labels is not None:
        raise ConversionError("give either --labels or --regions: with regions, dataset.json's labels are the "
                              "regions")
    # regions are checked before any file is read or written
    converter = (RegionLabelConverter(plan_regions(regions), label_map) if regions is not None
                 else LabelConverter(labels, label_map))
    if split_file is not None:  # a previous split fixes everything the source's list files would
        fixed_test = fixed_train = None
    with DatasetWriter(raw_root, dataset_id, name, sources=sources, overwrite=overwrite) as writer:
        labelled = sorted(c for c, case in cases.items() if case.has_label)
        if not labelled:
            raise ConversionError(f"none of the {len(cases)} cases in {', '.join(map(str, sources))} has a label")
        unlabelled_test = sorted(set(fixed_test or ()) - set(labelled))
        if unlabelled_test:
            where = cases[unlabelled_test[0]].where
            raise ConversionError(f"missing label: test case {unlabelled_test[0]} ({where}) has no label; test "
                                  f"cases need one ({len(unlabelled_test)} such case(s))")
        if fixed_train is not None:  # listed training images without a label are unlabeled images
            fixed_train = [c for c in fixed_train if c in set(labelled)]
        split = make_split(labelled, labeled=labeled, test=test, seed=seed, fixed_test=fixed_test,
                           fixed_train=fixed_train, unlabeled_only=sorted(set(cases) - set(labelled)),
                           labeled_order=labeled_order, group_name=group_name,
                           groups=None if groups is None else {c: groups[c] for c in labelled},
                           previous=load_split_file(split_file) if split_file else None)
        split.info.update({"source": [str(Path(s).resolve()) for s in sources], **(split_info or {})})
        return write_volume_dataset(cases, split, writer, converter, channel_names, name, description)
