"""Derm7pt, the seven-point checklist dermatology dataset (Kawahara et al., IEEE JBHI 2018).

Source layout (release_v0): ``meta/meta.csv`` with one row per case, header ``case_num, diagnosis,
seven_point_score, pigment_network, streaks, pigmentation, regression_structures, dots_and_globules,
blue_whitish_veil, vascular_structures, level_of_diagnostic_difficulty, elevation, location, sex, management,
clinic, derm, case_id, notes`` (``clinic``/``derm``: image paths relative to ``images/``; ``case_id``: an atlas
identifier filled for a few rows only; ``notes``: free text) and ``meta/train_indexes.csv``, ``valid_indexes.csv``,
``test_indexes.csv`` (column ``indexes``: 0-based row numbers of ``meta.csv``).

Conversion: the dermoscopic image (``derm``, or the clinical photo with ``image_column="clinic"``) is written as
an RGB PNG; there are no lesion masks, so the label map marks the whole image as label 1 (``roi``).

Classes: by default the five groups of Kawahara et al. (``BCC``, ``NEV``, ``MEL``, ``MISC``, ``SK``); ``raw``
keeps the 20 diagnosis strings. Features (:data:`FEATURE_SETS`):

* ``clinical`` (default): ``sex``, ``location``, ``elevation``, the patient metadata of Kawahara et al., so that
  image + table means image + clinical data;
* ``all``: every column except identifiers, paths and free text (``case_num``, ``case_id``, ``clinic``,
  ``derm``, ``notes``): adds the seven checklist criteria, ``seven_point_score`` (the dermatologist's reading of
  the dermoscopic image) and ``level_of_diagnostic_difficulty`` (rated by the dermatologist, not patient data);
* ``cfcml``: the five columns CFCML's official Derm7pt loader feeds its tabular branch
  (``level_of_diagnostic_difficulty``, ``elevation``, ``location``, ``sex``, ``management``).

``management`` leaks the diagnosis (excision vs follow-up is decided from it): outside ``cfcml`` it is written
only with ``include_leaky``. The official split is honoured: test = ``test_indexes``, training pool =
``train_indexes`` + ``valid_indexes`` (nnU-Net cross-validates on its own).
"""
from __future__ import annotations

import re
from pathlib import Path

from nnunet_ext.conversion.common import ConversionError, require_source_folder, resolve_raw_root, warn
from nnunet_ext.conversion.natural_images import ImageCase, convert_image_classification

# Diagnosis groups of Kawahara et al. 2018 (the 5-class task of the derm7pt package), in class-index order.
DIAGNOSIS_GROUPS: dict[str, tuple[str, ...]] = {
    "BCC": ("basal cell carcinoma",),
    "NEV": ("blue nevus", "clark nevus", "combined nevus", "congenital nevus", "dermal nevus", "recurrent nevus",
            "reed or spitz nevus"),
    "MEL": ("melanoma", "melanoma (in situ)", "melanoma (less than 0.76 mm)", "melanoma (0.76 to 1.5 mm)",
            "melanoma (more than 1.5 mm)", "melanoma metastasis"),
    "MISC": ("dermatofibroma", "lentigo", "melanosis", "miscellaneous", "vascular lesion"),
    "SK": ("seborrheic keratosis",),
}
DIAGNOSIS_MODES = ("grouped", "raw")
IMAGE_COLUMNS = ("derm", "clinic")
# ``case_id`` is the release's own (atlas) identifier column, not ours: never a feature.
NOT_FEATURES = ("case_num", "case_id", "clinic", "derm", "notes", "diagnosis")
LEAKY_COLUMNS = ("management",)
CLINICAL_COLUMNS = ("sex", "location", "elevation")
CFCML_COLUMNS = ("level_of_diagnostic_difficulty", "elevation", "location", "sex", "management")
FEATURE_SETS = ("clinical", "all", "cfcml")
# Words of a ``notes`` cell saying that the ``clinic`` photo is in fact a dermoscopic image.
DERMOSCOPIC_NOTE = re.compile(r"dermoscop|dermatoscop", re.IGNORECASE)
INDEX_FILES = {"train": "train_indexes.csv", "valid": "valid_indexes.csv", "test": "test_indexes.csv"}


def _read_indexes(path: Path, num_rows: int) -> list[int]:
    import pandas as pd

    table = pd.read_csv(path)
    if "indexes" not in table.columns:
        raise ConversionError(f"{path}: expected a column 'indexes' (0-based rows of meta.csv), found "
                              f"{list(table.columns)}")
    values = [int(v) for v in table["indexes"]]
    bad = [v for v in values if not 0 <= v < num_rows]
    if bad:
        raise ConversionError(f"{path}: row indexes {bad[:5]} are outside meta.csv's {num_rows} rows")
    return values


def _feature_columns(header: list[str], features: str, include_leaky: bool, meta_path: Path) -> list[str]:
    """The columns of ``meta.csv`` written as features for the feature set ``features``, in header order."""
    if features == "all":
        excluded = set(NOT_FEATURES) | (set() if include_leaky else set(LEAKY_COLUMNS))
        return [c for c in header if c not in excluded]
    wanted = CFCML_COLUMNS if features == "cfcml" else CLINICAL_COLUMNS + (LEAKY_COLUMNS if include_leaky else ())
    missing = [c for c in wanted if c not in header]
    if missing:
        raise ConversionError(f"{meta_path}: --features {features} needs the column(s) {missing}; columns found: "
                              f"{header}")
    return [c for c in header if c in wanted]


def convert_derm7pt(source: str | Path, dataset_id: int, name: str = "Derm7pt", output: str | Path | None = None,
                    *, image_column: str = "derm", diagnosis: str = "grouped", features: str = "clinical",
                    include_leaky: bool = False, ignore_lists: bool = False, labeled: str | None = None,
                    test: str | None = None, seed: int = 0, split_file: str | Path | None = None,
                    overwrite: bool = False) -> Path:
    """Convert Derm7pt into ``Dataset<ID>_<name>``: RGB PNG (JPG re-encoded) + whole-image ``roi`` map +
    ``tabular.csv``; splits are stratified by class when random (``ignore_lists`` or no index files).

    ``features`` is one of :data:`FEATURE_SETS` (see the module docstring). With ``image_column="clinic"``,
    cases whose ``notes`` say that the clinical photo is dermoscopic are reported (warning and ``split.json``).
    """
    import pandas as pd

    source = require_source_folder(source, "Derm7pt folder")
    if image_column not in IMAGE_COLUMNS:
        raise ConversionError(f"image_column must be one of {IMAGE_COLUMNS}, got {image_column!r}")
    if diagnosis not in DIAGNOSIS_MODES:
        raise ConversionError(f"diagnosis must be one of {DIAGNOSIS_MODES}, got {diagnosis!r}")
    if features not in FEATURE_SETS:
        raise ConversionError(f"features must be one of {FEATURE_SETS} (--features), got {features!r}")
    meta_path = source / "meta" / "meta.csv"
    if not meta_path.is_file():
        raise ConversionError(f"{source}: expected the Derm7pt layout with meta/meta.csv")
    meta = pd.read_csv(meta_path, dtype=object, keep_default_na=False)
    missing = [c for c in ("diagnosis", image_column) if c not in meta.columns]
    if missing:
        raise ConversionError(f"{meta_path}: no column(s) {missing} (the diagnosis and the image path are read from "
                              f"'diagnosis' and '{image_column}'); columns found: {list(meta.columns)}")
    group_of = {raw: group for group, raws in DIAGNOSIS_GROUPS.items() for raw in raws}
    if diagnosis == "grouped":
        class_names = tuple(DIAGNOSIS_GROUPS)
    else:
        class_names = tuple(sorted({str(d).strip() for d in meta["diagnosis"]}))
    feature_columns = _feature_columns(list(meta.columns), features, include_leaky, meta_path)

    cases: list[ImageCase] = []
    case_of_row: dict[int, str] = {}
    dermoscopic_clinic: list[str] = []
    for row_number, row in enumerate(meta.to_dict("records")):
        where = f"{meta_path} row {row_number} (0-based, header excluded)"
        raw = str(row["diagnosis"]).strip()
        if not raw:
            raise ConversionError(f"{where}: empty diagnosis")
        if diagnosis == "grouped":
            if raw.lower() not in group_of:
                raise ConversionError(f"{where}: diagnosis {raw!r} is not in the Derm7pt groups "
                                      f"{sorted(group_of)}; use diagnosis='raw' (--diagnosis raw)")
            label = group_of[raw.lower()]
        else:
            label = raw
        number = str(row.get("case_num", "")).strip()
        case_id = f"derm7pt_{int(number):04d}" if number.isdigit() else f"derm7pt_row{row_number:04d}"
        relative = str(row[image_column]).strip()
        if not relative:
            raise ConversionError(f"{where}: empty '{image_column}' image path")
        image = source / "images" / relative
        if not image.is_file():
            raise ConversionError(f"case {case_id} ({where}): image file {image} does not exist")
        values = {c: (str(row[c]).strip() or None) for c in feature_columns}
        cases.append(ImageCase(case_id, image, label, values))
        if image_column == "clinic" and DERMOSCOPIC_NOTE.search(str(row.get("notes", ""))):
            dermoscopic_clinic.append(case_id)
        case_of_row[row_number] = case_id
    if len(set(case_of_row.values())) != len(case_of_row):
        raise ConversionError(f"{meta_path}: duplicate case_num values")
    if dermoscopic_clinic:
        warn(f"{len(dermoscopic_clinic)} case(s) whose 'clinic' image is dermoscopic according to 'notes': "
             f"{', '.join(dermoscopic_clinic)} (listed in split.json as clinic_image_dermoscopic)")

    fixed_test = fixed_train = None
    index_paths = {k: source / "meta" / v for k, v in INDEX_FILES.items()}
    used = []
    if not ignore_lists and split_file is None and index_paths["test"].is_file():
        indexes = {k: _read_indexes(p, len(meta)) if p.is_file() else [] for k, p in index_paths.items()}
        fixed_test = [case_of_row[i] for i in indexes["test"]]
        fixed_train = [case_of_row[i] for i in indexes["train"] + indexes["valid"]]
        used = [str(p) for p in index_paths.values() if p.is_file()]
        warn(f"using the official Derm7pt split ({', '.join(Path(u).name for u in used)}); valid joins training "
             f"(--ignore-lists for a random stratified split)")
    return convert_image_classification(
        cases, class_names=class_names, feature_columns=feature_columns, roi_name="roi",
        raw_root=resolve_raw_root(output), dataset_id=dataset_id, name=name, sources=[source], labeled=labeled,
        test=test, seed=seed, split_file=split_file, overwrite=overwrite, fixed_test=fixed_test,
        fixed_train=fixed_train,
        description=f"Derm7pt (Kawahara et al. 2018) converted by nnunet-ext: {image_column} images, whole-image "
                    f"roi label, {diagnosis} diagnosis in tabular.csv",
        split_info={"converter": "derm7pt", "image_column": image_column, "diagnosis": diagnosis,
                    "features": features, "include_leaky": include_leaky, "list_files": used,
                    **({"clinic_image_dermoscopic": dermoscopic_clinic} if image_column == "clinic" else {})})
