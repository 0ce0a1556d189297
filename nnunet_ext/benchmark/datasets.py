"""The benchmark's dataset: where it is, its held-out test split, the checks run before any training starts.

Everything here reads the user's ``nnUNet_raw``/``nnUNet_preprocessed`` and writes nothing; every problem is a
:class:`BenchmarkError` that names the file or case and what was expected.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nnunet_ext.errors import InputError


class BenchmarkError(InputError, RuntimeError):
    """A problem with the inputs of a benchmark, found before any run starts."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    raw: Path
    preprocessed: Path
    dataset_json: dict
    test_images: Path
    test_labels: Path
    test_cases: tuple[str, ...]
    image_cases: tuple[str, ...]


def check_missing_channels(info: DatasetInfo, missing: Sequence[str]) -> None:
    """``--missing-channels`` must name channels of the dataset (``channel_names`` values) and leave one present.

    Raises:
        BenchmarkError: naming the unknown channel and the dataset's channels.
    """
    names = [info.dataset_json["channel_names"][k] for k in sorted(info.dataset_json["channel_names"], key=int)]
    unknown = [c for c in missing if c not in names]
    if unknown:
        raise BenchmarkError(f"--missing-channels {unknown}: not a channel of {info.name}; its channels are {names}")
    if len(set(missing)) >= len(names):
        raise BenchmarkError(f"--missing-channels would remove every channel of {info.name} ({names}); at least one "
                             f"must stay present")


def nnunet_folder(var: str) -> Path:
    """The folder an nnU-Net environment variable (``nnUNet_raw``, ...) names; an error if it is unset."""
    value = os.environ.get(var)
    if not value:
        raise BenchmarkError(f"{var} is not set: the benchmark reads the dataset from nnUNet_raw and its plans from "
                             f"nnUNet_preprocessed (trained models go to OUTPUT/nnUNet_results)")
    return Path(value)


def _channel_count(dataset_json: dict) -> int:
    channels = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not channels:
        raise BenchmarkError("dataset.json has neither channel_names nor modality")
    return len(channels)


def resolve_dataset(dataset: str, test_split: bool = True) -> DatasetInfo:
    """Find a dataset and check its held-out test split (``imagesTs`` + ``labelsTs``).

    With ``test_split=False`` (cross-validation: the folds' validation cases are the test cases) the test split is
    neither needed nor read, and the returned info has no test cases.

    Raises:
        BenchmarkError: unknown dataset, missing test folders, a label without its images (named).
    """
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    raw_base, preprocessed_base = nnunet_folder("nnUNet_raw"), nnunet_folder("nnUNet_preprocessed")
    try:
        name = str(maybe_convert_to_dataset_name(dataset))
    except (RuntimeError, ValueError) as e:
        raise BenchmarkError(f"dataset {dataset!r}: {e}") from e
    raw = raw_base / name
    if not (raw / "dataset.json").is_file():
        raise BenchmarkError(f"{raw / 'dataset.json'} not found (convert the dataset into nnUNet_raw first)")
    dataset_json = json.loads((raw / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    images, labels = raw / "imagesTs", raw / "labelsTs"
    if not test_split:
        return DatasetInfo(name, raw, preprocessed_base / name, dataset_json, images, labels, (), ())
    for folder in (images, labels):
        if not folder.is_dir():
            raise BenchmarkError(f"{folder} does not exist: the benchmark evaluates on the dataset's held-out test "
                                 f"split (imagesTs + labelsTs)")
    cases = tuple(sorted(p.name[:-len(ending)] for p in labels.iterdir() if p.name.endswith(ending)))
    if not cases:
        raise BenchmarkError(f"{labels} holds no segmentation ending in {ending}")
    n_channels = _channel_count(dataset_json)
    missing = [f"{case}_{c:04d}{ending}" for case in cases for c in range(n_channels)
               if not (images / f"{case}_{c:04d}{ending}").is_file()]
    if missing:
        raise BenchmarkError(f"{len(missing)} test image file(s) missing in {images} (expected {n_channels} "
                             f"channel(s) per case in labelsTs): {missing[:10]}")
    suffix = f"_0000{ending}"
    image_cases = tuple(sorted(p.name[:-len(suffix)] for p in images.iterdir() if p.name.endswith(suffix)))
    return DatasetInfo(name, raw, preprocessed_base / name, dataset_json, images, labels, cases, image_cases)


def check_same_test_cases(main: DatasetInfo, other: DatasetInfo) -> None:
    """The upper-bound dataset must have exactly the same test cases and reference segmentations.

    Raises:
        BenchmarkError: different case names or a different reference segmentation (named).
    """
    import numpy as np
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    if main.test_cases != other.test_cases:
        only_main = sorted(set(main.test_cases) - set(other.test_cases))
        only_other = sorted(set(other.test_cases) - set(main.test_cases))
        raise BenchmarkError(f"the upper-bound dataset {other.name} must have the same test cases as {main.name}; "
                             f"only in {main.name}: {only_main[:10]}, only in {other.name}: {only_other[:10]}")
    ending = main.dataset_json["file_ending"]
    reader = determine_reader_writer_from_dataset_json(main.dataset_json, str(main.test_labels /
                                                                              f"{main.test_cases[0]}{ending}"))()
    for case in main.test_cases:
        a, _ = reader.read_seg(str(main.test_labels / f"{case}{ending}"))
        b, _ = reader.read_seg(str(other.test_labels / f"{case}{other.dataset_json['file_ending']}"))
        if a.shape != b.shape or not np.array_equal(a, b):
            raise BenchmarkError(f"test case {case}: the reference segmentation differs between {main.name} and "
                                 f"{other.name}")


def plans_differences(plans_a: Path, plans_b: Path, configuration: str) -> dict[str, list]:
    """Configuration entries that differ between two plans files (``{key: [value_a, value_b]}``).

    The upper-bound dataset is planned on its own (as stock nnU-Net would); its fingerprint has more labeled
    cases, so patch size, spacing or batch size may differ, and the report says so next to the gap bound.
    """
    a = json.loads(Path(plans_a).read_text())["configurations"][configuration]
    b = json.loads(Path(plans_b).read_text())["configurations"][configuration]
    keys = ("patch_size", "spacing", "batch_size", "normalization_schemes", "architecture")
    return {k: [a.get(k), b.get(k)] for k in keys if a.get(k) != b.get(k)}
