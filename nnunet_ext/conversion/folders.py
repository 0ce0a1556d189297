"""Converters for folders of volumes: ``images/ + labels/`` (e.g. MSD Hippocampus as stored in
``shared/data/Hippocampus``) and one folder per case with one file per modality (e.g. ``BraTS2018_FLAIR_T1``).

For complete MSD task folders (``imagesTr``, ``labelsTr``, 4D images, ``dataset.json``) use nnU-Net's own
``nnUNetv2_convert_MSD_dataset`` instead.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from nnunet_ext.conversion.common import (
    VOLUME_ENDINGS,
    ConversionError,
    file_ending,
    require_source_folder,
    resolve_raw_root,
    strip_ending,
    warn,
)
from nnunet_ext.conversion.splits import SPLIT_FILE_NAME
from nnunet_ext.conversion.volumes import VolumeCase, convert_volume_cases

MISSING_LABEL_POLICIES = ("unlabeled", "error")
ORPHAN_LABEL_POLICIES = ("skip", "error")


def _volume_files(folder: Path) -> dict[str, Path]:
    """case id -> file for every image file in ``folder`` (hidden files ignored)."""
    if not folder.is_dir():
        raise ConversionError(f"{folder} is not a folder")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or file_ending(path) is None:
            continue
        case = strip_ending(path)
        if case in files:
            raise ConversionError(f"{folder}: two files for case {case}: {files[case].name} and {path.name}")
        files[case] = path
    return files


def _check_policy(value: str, allowed: Sequence[str], option: str) -> None:
    if value not in allowed:
        raise ConversionError(f"{option} must be one of {list(allowed)}, got {value!r}")


def convert_folders(source: str | Path, dataset_id: int, name: str, output: str | Path | None = None, *,
                    images_dir: str = "images", labels_dir: str = "labels", channel_name: str = "image",
                    labels: Mapping[str, int] | None = None, label_map: Mapping[int, int] | None = None,
                    labeled: str | None = None, test: str | None = None, seed: int = 0,
                    split_file: str | Path | None = None, missing_label: str = "unlabeled",
                    orphan_labels: str = "skip", overwrite: bool = False,
                    regions: Mapping[str, int | Sequence[int]] | None = None) -> Path:
    """Convert ``source/images/<case>.<ext>`` + ``source/labels/<case>.<ext>`` into ``Dataset<ID>_<name>``.

    Images without a label become unlabeled images (``imagesUnlabeled``) unless ``missing_label="error"``;
    labels without an image are skipped with a warning unless ``orphan_labels="error"``.

    Args:
        source: folder with ``images_dir`` and ``labels_dir`` (single-channel volumes, any SimpleITK format).
        output: the ``nnUNet_raw`` folder to write into (default: ``$nnUNet_raw``).
        channel_name: the ``channel_names`` entry of the single channel (``CT`` selects CT normalisation).
        labels: label names -> values; default: inferred as ``label_<v>``. label_map: source -> output values.
        labeled, test, seed, split_file: the semi-supervised split (see :func:`~nnunet_ext.conversion.splits.
            make_split`).
        regions: region name -> label values, instead of ``labels`` (nnU-Net's region-based training), as in
            :func:`convert_per_case`.

    Returns:
        The dataset folder.
    """
    source = require_source_folder(source)
    _check_policy(missing_label, MISSING_LABEL_POLICIES, "missing_label")
    _check_policy(orphan_labels, ORPHAN_LABEL_POLICIES, "orphan_labels")
    images = _volume_files(source / images_dir)
    label_files = _volume_files(source / labels_dir) if (source / labels_dir).is_dir() else {}
    if not images:
        raise ConversionError(f"no image files ({', '.join(VOLUME_ENDINGS)}) in {source / images_dir}")
    without_label = sorted(set(images) - set(label_files))
    if without_label and missing_label == "error":
        raise ConversionError(f"missing label for {len(without_label)} image(s), e.g. "
                              f"{images[without_label[0]]}: expected {source / labels_dir / without_label[0]}"
                              f"{file_ending(images[without_label[0]])}")
    orphans = sorted(set(label_files) - set(images))
    if orphans:
        message = (f"{len(orphans)} label file(s) without an image in {source / images_dir}: "
                   f"{[label_files[c].name for c in orphans[:10]]}")
        if orphan_labels == "error":
            raise ConversionError(message)
        warn(message + "; skipped")
    if without_label:
        warn(f"{len(without_label)} image(s) without a label go to imagesUnlabeled: {without_label[:10]}")
    cases = {case: VolumeCase(case, str(path), image_files=[path], label_file=label_files.get(case))
             for case, path in images.items()}
    return convert_volume_cases(
        cases, raw_root=resolve_raw_root(output), dataset_id=dataset_id, name=name, channel_names=[channel_name],
        sources=[source], labels=labels, label_map=label_map, labeled=labeled, test=test, seed=seed,
        split_file=split_file, overwrite=overwrite, description=f"converted by nnunet-ext from {source}",
        split_info={"converter": "folders", "labels_without_image": orphans}, regions=regions)


def _match_file(files: Mapping[str, Path], wanted: str) -> Path | None:
    """The file whose name without ending is ``wanted`` (exact, else the unique case-insensitive match)."""
    if wanted in files:
        return files[wanted]
    matches = [path for stem, path in files.items() if stem.lower() == wanted.lower()]
    return matches[0] if len(matches) == 1 else None


def convert_per_case(source: str | Path, dataset_id: int, name: str, modalities: Sequence[str], label: str,
                     output: str | Path | None = None, *, channel_names: Sequence[str] | None = None,
                     labels: Mapping[str, int] | None = None, label_map: Mapping[int, int] | None = None,
                     labeled: str | None = None, test: str | None = None, seed: int = 0,
                     split_file: str | Path | None = None, missing_label: str = "unlabeled",
                     overwrite: bool = False, regions: Mapping[str, int | Sequence[int]] | None = None) -> Path:
    """Convert one folder per case, ``source/<case>/<MODALITY>.<ext>`` and ``source/<case>/<LABEL>.<ext>``.

    Args:
        modalities: file names without ending, in channel order (e.g. ``["FLAIR", "T1"]``); they become the
            ``channel_names`` unless ``channel_names`` is given. A name no case folder has is an error.
        label: file name of the label map without ending (e.g. ``GT_W``). Cases without it become unlabeled
            images unless ``missing_label="error"``.
        labels: label names -> values (e.g. ``{"background": 0, "whole_tumour": 1}``); default inferred.
        label_map: source value -> output value (e.g. BraTS ``{4: 3}``).
        regions: region name -> label values, instead of ``labels``, for nnU-Net's region-based training (e.g.
            ``{"whole tumour": [1, 2, 3, 4], "tumour core": [1, 3, 4], "enhancing tumour": [4]}``); the label files
            keep their values and ``dataset.json`` gets the regions and a derived ``regions_class_order`` (see
            :mod:`nnunet_ext.conversion.regions`).

    Every case must have every modality on the same grid (size and spacing) as its label. Files next to the case
    folders (README, dataset.json) and sub-folders without any image file (e.g. a ``ds2/`` copy at another
    resolution) are not cases; the latter are skipped with a warning. Other files in a case folder (a brain mask,
    a licence) are ignored.
    """
    source = require_source_folder(source)
    _check_policy(missing_label, MISSING_LABEL_POLICIES, "missing_label")
    modalities = [str(m) for m in modalities]
    if not modalities:
        raise ConversionError("name at least one modality file (e.g. --modalities FLAIR T1)")
    if channel_names is not None and len(channel_names) != len(modalities):
        raise ConversionError(f"{len(channel_names)} channel names for {len(modalities)} modalities")
    if label in modalities:
        raise ConversionError(f"the label file {label!r} is also listed as a modality")
    folders = [p for p in sorted(source.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    if not folders:
        raise ConversionError(f"{source} has no case folders")
    listings = {folder.name: _volume_files(folder) for folder in folders}
    not_cases = sorted(name for name, files in listings.items() if not files)
    if not_cases:
        warn(f"{len(not_cases)} folder(s) in {source} without image files are not cases and are skipped: "
             f"{not_cases[:10]}")
        listings = {name: files for name, files in listings.items() if files}
    if not listings:
        raise ConversionError(f"{source} has no case folders with image files ({', '.join(VOLUME_ENDINGS)})")
    for modality in modalities:
        if not any(_match_file(files, modality) for files in listings.values()):
            example = next(iter(listings))
            raise ConversionError(f"unknown modality {modality!r}: no case folder in {source} has a file named "
                                  f"{modality}.<ext>; {example} has {sorted(listings[example])}")
    cases = {}
    for case, files in listings.items():
        image_files = []
        for modality in modalities:
            path = _match_file(files, modality)
            if path is None:
                raise ConversionError(f"case {case}: no file for modality {modality!r} in {source / case} "
                                      f"(files: {sorted(files)})")
            image_files.append(path)
        label_file = _match_file(files, label)
        if label_file is None and missing_label == "error":
            raise ConversionError(f"case {case}: missing label: no file {label}.<ext> in {source / case} "
                                  f"(files: {sorted(files)})")
        cases[case] = VolumeCase(case, str(source / case), image_files=image_files, label_file=label_file)
    without_label = sorted(c for c, v in cases.items() if not v.has_label)
    if without_label:
        warn(f"{len(without_label)} case(s) without a {label} file go to imagesUnlabeled: {without_label[:10]}")
    return convert_volume_cases(
        cases, raw_root=resolve_raw_root(output), dataset_id=dataset_id, name=name,
        channel_names=list(channel_names) if channel_names is not None else modalities, sources=[source],
        labels=labels, label_map=label_map, labeled=labeled, test=test, seed=seed, split_file=split_file,
        overwrite=overwrite, description=f"converted by nnunet-ext from {source}",
        split_info={"converter": "per-case", "modalities": modalities, "label_file": label}, regions=regions)


def make_semi_supervised_pair(source: str | Path, output: str | Path | None, *, dataset_id: int,
                              upper_bound_id: int, name: str, upper_bound_name: str | None = None,
                              labeled: str = "0.1", test: str = "0.2", seed: int = 0, overwrite: bool = False,
                              **folder_options) -> tuple[Path, Path]:
    """Two datasets from one ``images/ + labels/`` source for a semi-supervised benchmark.

    1. ``Dataset<dataset_id>_<name>``: ``labeled`` of the training cases keep labels, the rest go to
       ``imagesUnlabeled``, ``test`` cases are held out (``imagesTs``/``labelsTs``).
    2. ``Dataset<upper_bound_id>_<upper_bound_name>``: the same test cases, every training case labelled (the
       fully supervised upper bound), made by re-using the first dataset's ``split.json`` with ``labeled="all"``.

    Equivalent CLI (Hippocampus)::

        nnunet-ext convert folders ../shared/data/Hippocampus -d 41 -n HippocampusSSL10 --labeled 0.1 --test 60 --seed 0
        nnunet-ext convert folders ../shared/data/Hippocampus -d 42 -n HippocampusFull --labeled all \\
            --split-file $nnUNet_raw/Dataset041_HippocampusSSL10/split.json
    """
    raw_root = resolve_raw_root(output)
    semi = convert_folders(source, dataset_id, name, raw_root, labeled=labeled, test=test, seed=seed,
                           overwrite=overwrite, **folder_options)
    full = convert_folders(source, upper_bound_id, upper_bound_name or f"{name}Full", raw_root, labeled="all",
                           split_file=semi / SPLIT_FILE_NAME, overwrite=overwrite, **folder_options)
    return semi, full
