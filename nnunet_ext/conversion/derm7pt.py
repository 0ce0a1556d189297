"""Derm7pt, the seven-point checklist dermatology dataset (Kawahara et al., IEEE JBHI 2018).

Source layout (release_v0): ``meta/meta.csv`` with one row per case (``case_num``, ``diagnosis``, the seven
checklist criteria ``pigment_network``, ``streaks``, ``pigmentation``, ``regression_structures``,
``dots_and_globules``, ``blue_whitish_veil``, ``vascular_structures``, ``seven_point_score``,
``level_of_diagnostic_difficulty``, clinical fields ``elevation``, ``location``, ``sex``, ``management``, the image
paths ``clinic`` and ``derm`` relative to ``images/``, ``notes``) and ``meta/train_indexes.csv``,
``valid_indexes.csv``, ``test_indexes.csv`` (column ``indexes``: 0-based row numbers of ``meta.csv``).

Conversion: the dermoscopic image (``derm``, or the clinical photo with ``image_column="clinic"``) is written as
an RGB PNG; there are no lesion masks, so the label map marks the whole image as label 1 (``roi``).

Classes: by default the five groups of Kawahara et al. (``BCC``, ``NEV``, ``MEL``, ``MISC``, ``SK``); ``raw``
keeps the 20 diagnosis strings. Features: every column except the identifiers/paths (``case_num``, ``clinic``,
``derm``), the free-text ``notes`` and the leaking ``management`` (excision vs follow-up is decided from the
diagnosis; ``include_leaky`` adds it back). The official split is honoured: test = ``test_indexes``, training
pool = ``train_indexes`` + ``valid_indexes`` (nnU-Net cross-validates on its own).
"""
from __future__ import annotations

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
NOT_FEATURES = ("case_num", "clinic", "derm", "notes", "diagnosis")
LEAKY_COLUMNS = ("management",)
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


def convert_derm7pt(source: str | Path, dataset_id: int, name: str = "Derm7pt", output: str | Path | None = None,
                    *, image_column: str = "derm", diagnosis: str = "grouped", include_leaky: bool = False,
                    ignore_lists: bool = False, labeled: str | None = None, test: str | None = None, seed: int = 0,
                    split_file: str | Path | None = None, overwrite: bool = False) -> Path:
    """Convert Derm7pt into ``Dataset<ID>_<name>``: RGB PNG (JPG re-encoded) + whole-image ``roi`` map +
    ``tabular.csv``; splits are stratified by class when random (``ignore_lists`` or no index files)."""
    import pandas as pd

    source = require_source_folder(source, "Derm7pt folder")
    if image_column not in IMAGE_COLUMNS:
        raise ConversionError(f"image_column must be one of {IMAGE_COLUMNS}, got {image_column!r}")
    if diagnosis not in DIAGNOSIS_MODES:
        raise ConversionError(f"diagnosis must be one of {DIAGNOSIS_MODES}, got {diagnosis!r}")
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
    excluded = set(NOT_FEATURES) | (set() if include_leaky else set(LEAKY_COLUMNS))
    feature_columns = [c for c in meta.columns if c not in excluded]

    cases: list[ImageCase] = []
    case_of_row: dict[int, str] = {}
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
        features = {c: (str(row[c]).strip() or None) for c in feature_columns}
        cases.append(ImageCase(case_id, image, label, features))
        case_of_row[row_number] = case_id
    if len(set(case_of_row.values())) != len(case_of_row):
        raise ConversionError(f"{meta_path}: duplicate case_num values")

    fixed_test = fixed_train = None
    index_paths = {k: source / "meta" / v for k, v in INDEX_FILES.items()}
    used = []
    if not ignore_lists and index_paths["test"].is_file():
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
                    "include_leaky": include_leaky, "list_files": used})
