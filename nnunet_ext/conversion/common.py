"""Shared machinery of the dataset converters: the output folder, label values and image geometry checks.

Every converter writes through :class:`DatasetWriter`: files go into a hidden staging folder next to the target,
the result is checked with nnU-Net's ``verify_dataset_integrity`` (which covers ``imagesTr``/``labelsTr`` only, so
the converters check test and unlabeled cases themselves while writing), and only then is the staging folder
moved to ``<raw_root>/DatasetXXX_Name``. A failed conversion leaves nothing behind, and ``--overwrite`` removes an
existing dataset only after the new one is complete. Inputs are only read.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from nnunet_ext.conversion.splits import SPLIT_FILE_NAME, Split
from nnunet_ext.errors import InputError

# Part of a split -> (images folder, labels folder or None).
PART_FOLDERS = {
    "labeled": ("imagesTr", "labelsTr"),
    "unlabeled": ("imagesUnlabeled", None),
    "unlabeled_only": ("imagesUnlabeled", None),
    "test": ("imagesTs", "labelsTs"),
}
# Endings SimpleITK reads that nnU-Net's SimpleITKIO also accepts for raw data.
VOLUME_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".gipl")


class ConversionError(InputError):
    """Bad input for a converter: the message names the file or case and what was expected."""


class ConversionWarning(UserWarning):
    """Something was skipped or adjusted during conversion (the message says what)."""


def file_ending(path: str | Path, endings: Sequence[str] = VOLUME_ENDINGS) -> str | None:
    """The known ending of ``path`` (``.nii.gz`` before ``.gz``-less ones), or None."""
    name = str(path).lower()
    for ending in sorted(endings, key=len, reverse=True):
        if name.endswith(ending):
            return ending
    return None


def strip_ending(path: str | Path, endings: Sequence[str] = VOLUME_ENDINGS) -> str:
    name = Path(path).name
    ending = file_ending(name, endings)
    return name[: -len(ending)] if ending else name


def resolve_raw_root(output: str | Path | None) -> Path:
    """``output`` if given, else ``$nnUNet_raw`` (clear error when neither is set)."""
    if output is not None:
        return Path(output)
    env = os.environ.get("nnUNet_raw")
    if not env:
        raise ConversionError("no output folder: pass -o RAW_FOLDER or set the nnUNet_raw environment variable")
    return Path(env)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``Dataset{ID:03d}_{name}`` after checking both parts the way nnU-Net expects them."""
    if not isinstance(dataset_id, (int, np.integer)) or not 1 <= int(dataset_id) <= 999:
        raise ConversionError(f"dataset ID must be an integer in 1..999, got {dataset_id!r}")
    if not name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name):
        raise ConversionError(f"dataset name {name!r}: use letters, digits, '_' or '-' (no spaces or slashes)")
    return f"Dataset{int(dataset_id):03d}_{name}"


def folders_using_dataset_id(dataset_id: int, raw_root: str | Path, exclude: str = "") -> list[Path]:
    """``DatasetNNN_*`` folders with this ID in ``raw_root``, ``$nnUNet_preprocessed`` and ``$nnUNet_results``.

    Uses nnU-Net's own rule (``find_candidate_datasets``: sub-folders starting with ``Dataset%03d``); a folder
    named ``exclude`` (the dataset being written, e.g. re-converted with --overwrite) does not count.
    """
    # read at call time, like nnU-Net's lazy paths: callers (and tests) may set the variables late
    roots = [Path(raw_root)] + [Path(os.environ[v]) for v in ("nnUNet_preprocessed", "nnUNet_results")
                                if os.environ.get(v)]
    prefix = f"Dataset{int(dataset_id):03d}"
    return [folder for root in roots if root.is_dir() for folder in sorted(root.iterdir())
            if folder.is_dir() and folder.name.startswith(prefix) and folder.name != exclude]


def require_source_folder(source: str | Path, what: str = "source folder") -> Path:
    """``source`` as a Path; :class:`ConversionError` "folder not found" when it is not an existing folder."""
    source = Path(source)
    if not source.is_dir():
        problem = "is a file, not a folder" if source.exists() else "not found"
        raise ConversionError(f"{what} {source}: {problem}")
    return source


def _is_within(path: Path, other: Path) -> bool:
    try:
        path.resolve().relative_to(other.resolve())
        return True
    except ValueError:
        return False


class DatasetWriter:
    """Writes one nnU-Net raw dataset; use as a context manager and call :meth:`finish` at the end.

    Args:
        raw_root: the ``nnUNet_raw`` folder (created if missing).
        dataset_id, name: give the folder ``Dataset{ID:03d}_{name}``.
        sources: input folders/files; the output may not lie inside them or contain them (inputs are never
            modified).
        overwrite: replace an existing dataset folder of the same name (after the new one is complete).
        file_ending: nnU-Net ``file_ending`` of every written image and label (``.nii.gz``, ``.png``).

    Raises:
        FileExistsError: the dataset folder exists and ``overwrite`` is False.
        ConversionError: the output overlaps an input, or another ``DatasetNNN_*`` folder in ``raw_root``,
            ``$nnUNet_preprocessed`` or ``$nnUNet_results`` already uses the dataset ID (nnU-Net could not tell
            them apart).
    """

    def __init__(self, raw_root: str | Path, dataset_id: int, name: str, *, sources: Iterable[str | Path] = (),
                 overwrite: bool = False, file_ending: str = ".nii.gz") -> None:
        self.raw_root = Path(raw_root)
        self.folder_name = dataset_folder_name(dataset_id, name)
        self.target = self.raw_root / self.folder_name
        self.file_ending = file_ending
        self.overwrite = overwrite
        for source in sources:
            source = Path(source)
            if _is_within(self.target, source) or _is_within(source, self.target):
                raise ConversionError(f"output {self.target} overlaps the input {source}; write the dataset "
                                      f"somewhere else (inputs are never modified)")
        if self.target.exists() and not overwrite:
            raise FileExistsError(f"{self.target} exists; pass --overwrite (overwrite=True) to replace it")
        same_id = folders_using_dataset_id(int(dataset_id), self.raw_root, exclude=self.folder_name)
        if same_id:
            raise ConversionError(f"dataset ID {int(dataset_id)} is already used by {same_id[0]}; nnU-Net finds "
                                  f"datasets by ID in nnUNet_raw, nnUNet_preprocessed and nnUNet_results, so every "
                                  f"nnU-Net command would fail on two names: choose another -d")
        self.staging = self.raw_root / f".{self.folder_name}.partial"
        self._written: dict[str, int] = {}

    def __enter__(self) -> DatasetWriter:
        if self.staging.exists():  # left behind by an interrupted run of ours
            shutil.rmtree(self.staging)
        self.staging.mkdir(parents=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)

    def image_path(self, part: str, case: str, channel: int = 0) -> Path:
        folder = self.staging / PART_FOLDERS[part][0]
        folder.mkdir(exist_ok=True)
        return folder / f"{case}_{channel:04d}{self.file_ending}"

    def label_path(self, part: str, case: str) -> Path:
        name = PART_FOLDERS[part][1]
        if name is None:
            raise ValueError(f"part {part!r} has no labels")
        folder = self.staging / name
        folder.mkdir(exist_ok=True)
        return folder / f"{case}{self.file_ending}"

    def write_text(self, relative: str, text: str) -> Path:
        path = self.staging / relative
        path.write_text(text)
        return path

    def finish(self, dataset_json: Mapping, split: Split, verify: bool = True) -> Path:
        """Write ``dataset.json`` and ``split.json``, run nnU-Net's integrity check, move into place."""
        from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

        if len(split.labeled) < 5:
            warn(f"only {len(split.labeled)} labelled training case(s): nnU-Net's default 5-fold cross-validation "
                 f"needs 5 (train fold 'all' or provide splits_final.json)")
        content = dict(dataset_json)
        content["numTraining"] = len(split.labeled)
        content["file_ending"] = self.file_ending
        (self.staging / "dataset.json").write_text(json.dumps(content, indent=2))
        (self.staging / SPLIT_FILE_NAME).write_text(json.dumps(split.to_json(), indent=2))
        if verify:
            verify_dataset_integrity(str(self.staging), num_processes=1)
        if self.target.exists():  # only reachable with overwrite=True (checked in __init__)
            shutil.rmtree(self.target)
        self.staging.rename(self.target)
        return self.target


class LabelConverter:
    """Checks and converts label maps to the integer values declared in ``dataset.json``.

    Args:
        labels: name -> value, e.g. ``{"background": 0, "tumour": 1}``; values must be 0, 1, 2, ... with 0 named
            ``background`` (nnU-Net's rule). None: infer the values from the data (names ``label_<v>``).
        value_map: source value -> output value applied first, e.g. ``{255: 1}`` for 0/255 masks.

    :meth:`convert` raises :class:`ConversionError` naming the file for non-integer or undeclared values.
    """

    def __init__(self, labels: Mapping[str, int] | None = None, value_map: Mapping[int, int] | None = None) -> None:
        if labels is not None:
            labels = {str(k): int(v) for k, v in labels.items()}
            values = sorted(labels.values())
            if values != list(range(len(values))):
                raise ConversionError(f"label values must be 0, 1, 2, ... without gaps or duplicates, got {labels}")
            if labels.get("background") != 0:
                raise ConversionError(f"labels must name value 0 'background' (nnU-Net's convention), got {labels}")
        self.labels = labels
        self.value_map = {int(k): int(v) for k, v in (value_map or {}).items()}
        self.seen: set[int] = set()

    def convert(self, array: np.ndarray, where: str) -> np.ndarray:
        """``array`` (any shape) -> uint8/uint16 label map; ``where`` names the file/case in errors."""
        if np.issubdtype(array.dtype, np.floating):
            if not np.all(np.isfinite(array)):
                raise ConversionError(f"{where}: label map contains NaN or infinite values")
            if not np.array_equal(array, np.round(array)):
                raise ConversionError(f"{where}: label map has non-integer values (e.g. "
                                      f"{array[array != np.round(array)].flat[0]}); expected integer labels")
        elif not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
            raise ConversionError(f"{where}: label map has unsupported type {array.dtype}")
        values = np.unique(array).astype(np.int64)
        out = array.astype(np.int64)
        if self.value_map:
            mapped = out.copy()
            for source, target in self.value_map.items():
                mapped[out == source] = target
            out = mapped
            values = np.unique(out)
        if values.min() < 0:
            raise ConversionError(f"{where}: negative label value {values.min()}")
        allowed = self.allowed_values()
        if allowed is not None:
            unexpected = [int(v) for v in values if int(v) not in allowed]
            if unexpected:
                raise ConversionError(self.undeclared_values_message(where, unexpected))
        self.seen.update(int(v) for v in values)
        return out.astype(np.uint8 if values.max() < 256 else np.uint16)

    def allowed_values(self) -> set[int] | None:
        """Values a label map may contain after ``value_map`` (None: any, the labels are inferred)."""
        return None if self.labels is None else set(self.labels.values())

    def undeclared_values_message(self, where: str, unexpected: list[int]) -> str:
        return (f"{where}: label values {unexpected} are not in dataset.json's labels {self.labels}; declare them "
                f"(--labels NAME=VALUE ...) or map them (--label-map SOURCE=TARGET)")

    def dataset_json_entries(self) -> dict:
        """The label entries of ``dataset.json`` (here ``labels``; region converters add ``regions_class_order``),
        asked for once every label map is converted."""
        return {"labels": self.dataset_labels()}

    def dataset_labels(self) -> dict[str, int]:
        """The ``labels`` entry of ``dataset.json`` (declared, or inferred from every converted map)."""
        if self.labels is not None:
            return dict(self.labels)
        values = sorted(self.seen | {0})
        if values != list(range(len(values))):
            raise ConversionError(f"label values found in the data are {values}, not 0, 1, 2, ...; map them to "
                                  f"consecutive values with --label-map SOURCE=TARGET")
        return {"background": 0, **{f"label_{v}": v for v in values[1:]}}


def _parse_pairs(items: Sequence[str] | None, option: str, example: str) -> list[tuple[str, str]] | None:
    if not items:
        return None
    pairs = []
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConversionError(f"{option}: expected {example}, got {item!r}")
        pairs.append((key.strip(), value.strip()))
    return pairs


def parse_label_names(items: Sequence[str] | None) -> dict[str, int] | None:
    """``["background=0", "tumour=1"]`` -> ``{"background": 0, "tumour": 1}`` (``--labels``)."""
    pairs = _parse_pairs(items, "--labels", "NAME=VALUE (e.g. background=0 tumour=1)")
    if pairs is None:
        return None
    try:
        return {name: int(value) for name, value in pairs}
    except ValueError:
        raise ConversionError(f"--labels: values must be integers, got {list(items)}") from None


def parse_label_map(items: Sequence[str] | None) -> dict[int, int] | None:
    """``["255=1", "4=3"]`` -> ``{255: 1, 4: 3}`` (``--label-map SOURCE=TARGET``)."""
    pairs = _parse_pairs(items, "--label-map", "SOURCE=TARGET integers (e.g. 255=1)")
    if pairs is None:
        return None
    try:
        return {int(source): int(target) for source, target in pairs}
    except ValueError:
        raise ConversionError(f"--label-map: values must be integers, got {list(items)}") from None


def warn(message: str) -> None:
    warnings.warn(message, ConversionWarning, stacklevel=2)
