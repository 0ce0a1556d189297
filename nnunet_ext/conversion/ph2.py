"""PH2 dermoscopy (Mendonca et al. 2013): RGB image + lesion mask + 16 tabular attributes -> diagnosis.

Source layout (``shared/data/PH2``): ``images/IMDxxx.png``, ``masks/IMDxxx.png`` (0/255), ``PH2_dataset2.xlsx``
with one row per image. The diagnosis is the one column among ``Common Nevus``, ``Atypical Nevus`` and
``Melanoma`` marked ``X``. Header names contain line breaks (``"Asymmetry\\n(0/1/2)"``); features are renamed to
snake case without the value hint (``asymmetry``, ``pigment_network``, ``dots_globules``, ``streaks``,
``regression_areas``, ``blue_whitish_veil``, ``white``, ``red``, ``light_brown``, ``dark_brown``, ``blue_gray``,
``black``). Colour columns are present (``X`` -> 1) or absent (empty -> 0); other empty cells are missing.

Leaks: ``Histological Diagnosis`` names the diagnosis (mostly empty, filled for some nevi and melanomas) and is
excluded unless ``include_leaky``. The dermoscopic attributes are legitimate features but predict the diagnosis
strongly: report image-only, tabular-only and fused results side by side.
"""
from __future__ import annotations

import re
from pathlib import Path

from nnunet_ext.conversion.common import ConversionError, require_source_folder, resolve_raw_root, warn
from nnunet_ext.conversion.natural_images import ImageCase, convert_image_classification

DIAGNOSIS_COLUMNS = {"Common Nevus": "common_nevus", "Atypical Nevus": "atypical_nevus", "Melanoma": "melanoma"}
CLASS_NAMES = tuple(DIAGNOSIS_COLUMNS.values())
IMAGE_NAME_COLUMN = "Image Name"
LEAKY_COLUMNS = ("histological_diagnosis",)
COLOUR_COLUMNS = ("white", "red", "light_brown", "dark_brown", "blue_gray", "black")


def normalise_header(header: object) -> str:
    """``"Asymmetry\\n(0/1/2)"`` -> ``"Asymmetry (0/1/2)"`` (line breaks and repeated spaces collapsed)."""
    return " ".join(str(header).split())


def feature_name(header: str) -> str:
    """``"Dots/Globules (A/AT/T)"`` -> ``"dots_globules"``: snake case without the value hint in brackets."""
    base = normalise_header(header).split("(")[0]
    return re.sub(r"[^a-z0-9]+", "_", base.lower()).strip("_")


def _empty(value: object) -> bool:
    return value is None or (isinstance(value, float) and value != value) or str(value).strip() == ""


def read_ph2_table(path: str | Path, include_leaky: bool = False) -> tuple[dict[str, str], dict[str, dict],
                                                                          list[str]]:
    """Read ``PH2_dataset2.xlsx``: (image name -> class name, image name -> features, feature column names).

    Raises:
        ConversionError: missing file, missing image-name/diagnosis columns, or a row with zero or several
            diagnoses (the message names the file and image).
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"PH2 table {path} does not exist")
    try:
        table = pd.read_excel(path, dtype=object)
    except ImportError:
        raise ConversionError("reading PH2's .xlsx needs openpyxl: pip install 'nnunet-ext[ph2]'") from None
    table.columns = [normalise_header(c) for c in table.columns]
    lower = {c.lower(): c for c in table.columns}
    missing = [c for c in (IMAGE_NAME_COLUMN, *DIAGNOSIS_COLUMNS) if c.lower() not in lower]
    if missing:
        raise ConversionError(f"{path}: no column(s) {missing}; the diagnosis is read from the columns "
                              f"{list(DIAGNOSIS_COLUMNS)} (one marked X per row). Columns found: "
                              f"{list(table.columns)}")
    name_col = lower[IMAGE_NAME_COLUMN.lower()]
    diagnosis_cols = {lower[c.lower()]: cls for c, cls in DIAGNOSIS_COLUMNS.items()}
    features_cols = [c for c in table.columns if c != name_col and c not in diagnosis_cols]
    renamed = {c: feature_name(c) for c in features_cols}
    if len(set(renamed.values())) != len(renamed):
        raise ConversionError(f"{path}: feature columns collide after renaming: {renamed}")
    # Presence flags: empty means absent, not missing. The six colours by name (a column may be empty in a subset),
    # plus any other column whose only value is X.
    flags = {c for c in features_cols if renamed[c] in COLOUR_COLUMNS or (
        table[c].notna().any() and table[c].dropna().map(lambda v: str(v).strip().upper()).isin(["X"]).all())}
    keep = [c for c in features_cols if include_leaky or renamed[c] not in LEAKY_COLUMNS]
    classes: dict[str, str] = {}
    features: dict[str, dict] = {}
    for row_number, row in enumerate(table.to_dict("records"), start=2):
        if _empty(row[name_col]):
            raise ConversionError(f"{path}: row {row_number} has no {IMAGE_NAME_COLUMN}")
        image = str(row[name_col]).strip()
        marked = [cls for col, cls in diagnosis_cols.items() if not _empty(row[col])]
        if len(marked) != 1:
            raise ConversionError(f"{path}: image {image} (row {row_number}) has {len(marked)} diagnosis marks "
                                  f"{marked}; expected exactly one X among {list(DIAGNOSIS_COLUMNS)}")
        if image in classes:
            raise ConversionError(f"{path}: image {image} appears twice")
        classes[image] = marked[0]
        features[image] = {renamed[c]: (int(not _empty(row[c])) if c in flags else
                                        (None if _empty(row[c]) else
                                         (row[c].strip() if isinstance(row[c], str) else row[c])))
                           for c in keep}
    return classes, features, [renamed[c] for c in keep]


def convert_ph2(source: str | Path, dataset_id: int, name: str = "PH2", output: str | Path | None = None, *,
                table: str | Path | None = None, include_leaky: bool = False, labeled: str | None = None,
                test: str | None = None, seed: int = 0, split_file: str | Path | None = None,
                overwrite: bool = False) -> Path:
    """Convert PH2 into ``Dataset<ID>_<name>``: RGB PNG + lesion mask (label 1 ``lesion``) + ``tabular.csv``.

    Args:
        source: the PH2 folder (``images/``, ``masks/``, the table).
        table: the xlsx (default ``source/PH2_dataset2.xlsx``, else the only ``*.xlsx`` in ``source``).
        include_leaky: also write ``histological_diagnosis`` (it names the diagnosis).
        labeled, test, seed, split_file: split, stratified by diagnosis (PH2 has no official split).
    """
    source = require_source_folder(source, "PH2 folder")
    if table is None:
        table = source / "PH2_dataset2.xlsx"
        if not table.is_file():
            candidates = sorted(source.glob("*.xlsx"))
            if len(candidates) != 1:
                raise ConversionError(f"{source}: expected PH2_dataset2.xlsx (or exactly one .xlsx); found "
                                      f"{[c.name for c in candidates]}")
            table = candidates[0]
    classes, features, columns = read_ph2_table(table, include_leaky=include_leaky)
    images, masks = source / "images", source / "masks"
    if not images.is_dir():
        raise ConversionError(f"{source}: no images/ folder")
    cases = []
    for image_name in sorted(classes):
        image = images / f"{image_name}.png"
        if not image.is_file():
            raise ConversionError(f"{table}: image {image_name} has no file {image}")
        mask = masks / f"{image_name}.png"
        if not mask.is_file():
            raise ConversionError(f"case {image_name}: missing lesion mask {mask}")
        cases.append(ImageCase(image_name, image, classes[image_name], features[image_name], mask))
    not_in_table = sorted(p.stem for p in images.glob("*.png") if p.stem not in classes)
    if not_in_table:
        warn(f"{len(not_in_table)} image(s) have no row in {table.name} and are skipped: {not_in_table[:10]}")
    return convert_image_classification(
        cases, class_names=CLASS_NAMES, feature_columns=columns, roi_name="lesion",
        raw_root=resolve_raw_root(output), dataset_id=dataset_id, name=name, sources=[source], labeled=labeled,
        test=test, seed=seed, split_file=split_file, overwrite=overwrite,
        description="PH2 dermoscopy (Mendonca et al. 2013) converted by nnunet-ext: lesion masks, diagnosis in "
                    "tabular.csv",
        split_info={"converter": "ph2", "table": str(Path(table).resolve()), "include_leaky": include_leaky,
                    "images_without_row": not_in_table})
