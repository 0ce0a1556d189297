"""Image + tabular classification datasets in nnU-Net's natural-image format (shared by PH2 and Derm7pt).

What is written (the contract with the CFCML trainer):

* ``imagesTr|imagesTs|imagesUnlabeled/<case>_0000.png``: one RGB PNG per case. nnU-Net's ``NaturalImage2DIO``
  reads an ``H x W x 3`` PNG as three channels, so ``channel_names`` is ``{"0": "R", "1": "G", "2": "B"}`` with a
  single file per case (as in nnU-Net's ``Dataset120_RoadSegmentation``). Images are re-encoded through Pillow
  as 8-bit RGB (JPG -> PNG, alpha dropped, grey -> RGB).
* ``labelsTr|labelsTs/<case>.png``: the lesion mask (0/1) where the source has one, otherwise a map with 1
  everywhere (``roi``), so nnU-Net's planning, cropping and patch sampling work unchanged.
* ``dataset.json``: ``labels`` ``{"background": 0, "<lesion|roi>": 1}`` and the extra key
  ``"classification_labels"``: the class names in order (index i = class i).
* ``tabular.json``: ``{"classes": [...]}``, the same list. CFCML reads its class order from there (otherwise it
  would sort the labels), so training, ``predict-cls`` (``prob_<class>`` columns) and ``evaluate-cls`` use the
  index order of ``classification_labels``. Classes without a labelled training case are left out of both (with a
  warning): nnU-Net could not learn them.
* ``tabular.csv`` in the dataset root: ``case_id``, ``label`` (class name), then one column per feature; empty
  cells are missing values. Every case has a row; cases moved to ``imagesUnlabeled`` by ``--labeled`` have an
  empty ``label`` (their class is hidden like their mask).
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nnunet_ext.conversion.common import ConversionError, DatasetWriter, warn
from nnunet_ext.conversion.splits import Split, load_split_file, make_split

RGB_CHANNELS = {"0": "R", "1": "G", "2": "B"}
TABULAR_FILE = "tabular.csv"
TABULAR_JSON_FILE = "tabular.json"
RESERVED_COLUMNS = ("case_id", "label")


@dataclass
class ImageCase:
    """One 2D case: an RGB image file, its class name, tabular features and optionally a lesion mask file."""

    case_id: str
    image: Path
    label: str
    features: dict[str, object] = field(default_factory=dict)
    mask: Path | None = None


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: cannot read the image ({e})") from None


def _read_mask(path: Path, shape: tuple[int, int], case: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            mask = np.asarray(image)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: cannot read the mask ({e})") from None
    if mask.ndim == 3:  # an RGB(A) rendering of a binary mask: all colour channels must agree
        if not all(np.array_equal(mask[..., 0], mask[..., c]) for c in range(1, min(3, mask.shape[-1]))):
            raise ConversionError(f"case {case}: mask {path} is a colour image; expected a binary mask")
        mask = mask[..., 0]
    if mask.shape != shape:
        raise ConversionError(f"case {case}: mask {path} has size {mask.shape} (rows, columns) but the image has "
                              f"{shape}")
    values = set(np.unique(mask).tolist())
    if not (values <= {0, 1} or values <= {0, 255}):
        raise ConversionError(f"case {case}: mask {path} has values {sorted(values)[:10]}; expected a binary mask "
                              f"with 0/1 or 0/255")
    binary = (mask > 0).astype(np.uint8)
    if not binary.any():
        warn(f"case {case}: mask {path} is empty")
    return binary


def _write_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _classes_with_training_cases(class_names: Sequence[str], training_labels: Sequence[str]) -> list[str]:
    """``class_names`` (order kept) without the classes that no labelled training case has."""
    present = set(training_labels)
    dropped = [c for c in class_names if c not in present]
    if dropped:
        warn(f"class(es) {dropped} have no labelled training case and are left out of classification_labels and "
             f"tabular.json (their test or unlabeled cases keep the class name in tabular.csv)")
    return [c for c in class_names if c in present]


def convert_image_classification(cases: Sequence[ImageCase], *, class_names: Sequence[str],
                                 feature_columns: Sequence[str], roi_name: str, raw_root: Path, dataset_id: int,
                                 name: str, sources: Sequence[Path], labeled: str | None, test: str | None,
                                 seed: int, split_file: str | Path | None, overwrite: bool,
                                 fixed_test: Sequence[str] | None = None, fixed_train: Sequence[str] | None = None,
                                 description: str = "", split_info: Mapping | None = None) -> Path:
    """Write a natural-image classification dataset (see the module docstring); splits are stratified by class."""
    by_id = {c.case_id: c for c in cases}
    if len(by_id) != len(cases):
        raise ConversionError("duplicate case identifiers")
    if not cases:
        raise ConversionError(f"no cases found in {', '.join(map(str, sources))}")
    unknown = sorted({c.label for c in cases} - set(class_names))
    if unknown:
        raise ConversionError(f"class names {unknown} are not among {list(class_names)}")
    clashing = [c for c in feature_columns if c in RESERVED_COLUMNS]
    if clashing:
        raise ConversionError(f"feature column(s) {clashing} would repeat the columns {list(RESERVED_COLUMNS)} "
                              f"of {TABULAR_FILE}; exclude or rename them")
    if split_file is not None:
        fixed_test = fixed_train = None
    with DatasetWriter(raw_root, dataset_id, name, sources=sources, overwrite=overwrite,
                       file_ending=".png") as writer:
        split: Split = make_split(sorted(by_id), labeled=labeled, test=test, seed=seed,
                                  strata={c.case_id: c.label for c in cases}, fixed_test=fixed_test,
                                  fixed_train=fixed_train,
                                  previous=load_split_file(split_file) if split_file else None)
        split.info.update({"source": [str(Path(s).resolve()) for s in sources], **(split_info or {}),
                           "class_counts": {part: {k: sum(by_id[c].label == k for c in getattr(split, part))
                                                   for k in class_names}
                                            for part in ("labeled", "unlabeled", "test")}})
        rows = []
        for part in ("labeled", "test", "unlabeled"):
            for case_id in getattr(split, part):
                case = by_id[case_id]
                if not case.image.is_file():
                    raise ConversionError(f"case {case_id}: image file {case.image} does not exist")
                rgb = _read_rgb(case.image)
                if part != "unlabeled":
                    if case.mask is not None:
                        if not case.mask.is_file():
                            raise ConversionError(f"case {case_id}: mask file {case.mask} does not exist")
                        seg = _read_mask(case.mask, rgb.shape[:2], case_id)
                    else:
                        seg = np.ones(rgb.shape[:2], dtype=np.uint8)
                    _write_png(seg, writer.label_path(part, case_id))
                _write_png(rgb, writer.image_path(part, case_id))
                rows.append([case_id, "" if part == "unlabeled" else case.label,
                             *[_cell(case.features.get(col)) for col in feature_columns]])
        buffer = io.StringIO()
        table = csv.writer(buffer, lineterminator="\n")
        table.writerow(["case_id", "label", *feature_columns])
        table.writerows(sorted(rows))
        writer.write_text(TABULAR_FILE, buffer.getvalue())
        trained_classes = _classes_with_training_cases(class_names, [by_id[c].label for c in split.labeled])
        writer.write_text(TABULAR_JSON_FILE, json.dumps({"classes": trained_classes}, indent=2) + "\n")
        dataset_json = {"name": name, "description": description, "channel_names": RGB_CHANNELS,
                        "labels": {"background": 0, roi_name: 1}, "classification_labels": trained_classes}
        return writer.finish(dataset_json, split)
