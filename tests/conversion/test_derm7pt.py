"""``convert derm7pt`` on a generated Derm7pt-like folder (JPG images, meta.csv, official index files)."""
from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nnunet_ext.conversion.common import ConversionError, ConversionWarning
from nnunet_ext.conversion.derm7pt import DIAGNOSIS_GROUPS, convert_derm7pt
from nnunet_ext.conversion.splits import SplitError

pytestmark = pytest.mark.filterwarnings("ignore::nnunet_ext.conversion.common.ConversionWarning")

# The exact header of release_v0/meta/meta.csv (with its own, mostly empty, case_id column).
REAL_HEADER = ("case_num,diagnosis,seven_point_score,pigment_network,streaks,pigmentation,regression_structures,"
               "dots_and_globules,blue_whitish_veil,vascular_structures,level_of_diagnostic_difficulty,elevation,"
               "location,sex,management,clinic,derm,case_id,notes")
COLUMNS = REAL_HEADER.split(",")
CHECKLIST = ["seven_point_score", "pigment_network", "streaks", "pigmentation", "regression_structures",
             "dots_and_globules", "blue_whitish_veil", "vascular_structures"]
DIAGNOSES = ["basal cell carcinoma", "clark nevus", "melanoma (in situ)", "seborrheic keratosis", "dermal nevus",
             "lentigo", "melanoma", "reed or spitz nevus", "blue nevus", "vascular lesion", "melanoma metastasis",
             "clark nevus"]
GROUP = {raw: group for group, raws in DIAGNOSIS_GROUPS.items() for raw in raws}


def _write_source(root: Path, rows: list[dict] | None = None, columns=COLUMNS) -> list[dict]:
    rng = np.random.default_rng(0)
    (root / "meta").mkdir(parents=True)
    if rows is None:
        rows = []
        for i, diagnosis in enumerate(DIAGNOSES):
            folder = "Aal" if i % 2 else "Fbl"
            rows.append({"case_num": str(i + 1), "diagnosis": diagnosis, "seven_point_score": str(i % 5),
                         "pigment_network": "typical", "streaks": "absent", "pigmentation": "absent",
                         "regression_structures": "absent", "dots_and_globules": "regular",
                         "blue_whitish_veil": "absent" if i % 3 else "present", "vascular_structures": "absent",
                         "level_of_diagnostic_difficulty": "low", "elevation": ["flat", "palpable"][i % 2],
                         "location": "back", "sex": "" if i == 3 else ["male", "female"][i % 2],
                         "clinic": f"{folder}/C{i:03d}.jpg", "derm": f"{folder}/D{i:03d}.jpg",
                         "management": "excision" if "melanoma" in diagnosis else "clinical follow up",
                         # like the release: an atlas id and a note for a few rows only, empty elsewhere
                         "case_id": {2: "Fml012", 5: "Nhl034", 10: "Fgl007"}.get(i, ""),
                         "notes": {2: "clinic image is a dermoscopic image", 5: "lesion partly covered by hair"
                                   }.get(i, "")})
    for row in rows:
        for column in ("clinic", "derm"):
            path = root / "images" / row[column]
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 255, (18 + len(row["case_num"]), 24, 3), dtype=np.uint8)
            Image.fromarray(pixels if column == "derm" else pixels[..., 0]).save(path, quality=90)
    with open(root / "meta" / "meta.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    for name, indexes in (("train", range(0, 7)), ("valid", range(7, 9)), ("test", range(9, 12))):
        (root / "meta" / f"{name}_indexes.csv").write_text("indexes\n" + "".join(f"{i}\n" for i in indexes))
    return rows


def _read_table(folder: Path) -> tuple[list[str], list[dict]]:
    with open(folder / "tabular.csv", newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]


@pytest.fixture(scope="module")
def derm_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("derm7pt")
    return root, _write_source(root)


@pytest.fixture(scope="module")
def derm_dataset(derm_source, tmp_path_factory):
    root, _ = derm_source
    return convert_derm7pt(root, 30, output=tmp_path_factory.mktemp("raw_derm"))


def test_official_split_grouped_classes_and_roi(derm_source, derm_dataset):
    root, rows = derm_source
    folder = derm_dataset
    split = json.loads((folder / "split.json").read_text())
    assert split["test"] == [f"derm7pt_{i:04d}" for i in range(10, 13)]
    assert split["labeled"] == [f"derm7pt_{i:04d}" for i in range(1, 10)]  # train + valid
    dataset_json = json.loads((folder / "dataset.json").read_text())
    assert dataset_json["classification_labels"] == ["BCC", "NEV", "MEL", "MISC", "SK"]
    assert dataset_json["labels"] == {"background": 0, "roi": 1} and dataset_json["numTraining"] == 9

    # JPG -> PNG with the same pixels (decoded once), label map = whole image
    source_pixels = np.asarray(Image.open(root / "images" / rows[0]["derm"]).convert("RGB"))
    written = np.asarray(Image.open(folder / "imagesTr" / "derm7pt_0001_0000.png"))
    np.testing.assert_array_equal(written, source_pixels)
    roi = np.asarray(Image.open(folder / "labelsTr" / "derm7pt_0001.png"))
    assert roi.shape == source_pixels.shape[:2] and np.all(roi == 1)
    assert np.all(np.asarray(Image.open(folder / "labelsTs" / "derm7pt_0010.png")) == 1)

    header, table = _read_table(folder)
    assert header == ["case_id", "label", "elevation", "location", "sex"]  # default: --features clinical
    by_id = {r["case_id"]: r for r in table}
    assert by_id["derm7pt_0003"]["label"] == "MEL" and by_id["derm7pt_0001"]["label"] == "BCC"
    assert by_id["derm7pt_0004"]["sex"] == ""  # missing stays empty
    assert [by_id[f"derm7pt_{i + 1:04d}"]["label"] for i in range(12)] == [GROUP[d] for d in DIAGNOSES]


def test_derm7pt_bad_inputs(derm_source, tmp_path):
    root, rows = derm_source
    with pytest.raises(SplitError, match="--ignore-lists"):
        convert_derm7pt(root, 31, output=tmp_path / "raw", test="3")
    with pytest.raises(ConversionError, match="image_column"):
        convert_derm7pt(root, 31, output=tmp_path / "raw", image_column="photo")
    with pytest.raises(ConversionError, match=r"features must be one of .*got 'text'"):
        convert_derm7pt(root, 31, output=tmp_path / "raw", features="text")

    no_diagnosis = tmp_path / "no_diagnosis"
    _write_source(no_diagnosis, [dict(r) for r in rows], columns=[c for c in COLUMNS if c != "diagnosis"])
    with pytest.raises(ConversionError, match=r"meta.csv: no column\(s\) \['diagnosis'\]"):
        convert_derm7pt(no_diagnosis, 31, output=tmp_path / "raw")

    odd = tmp_path / "odd"
    _write_source(odd, [dict(r, diagnosis="unheard-of lesion") if i == 2 else dict(r) for i, r in enumerate(rows)])
    with pytest.raises(ConversionError, match=r"row 2 .*diagnosis 'unheard-of lesion' is not in the Derm7pt groups"):
        convert_derm7pt(odd, 31, output=tmp_path / "raw")

    missing = tmp_path / "missing"
    shutil.copytree(root, missing)
    (missing / "images" / rows[5]["derm"]).unlink()
    with pytest.raises(ConversionError, match=r"case derm7pt_0006 .*D005.jpg does not exist"):
        convert_derm7pt(missing, 31, output=tmp_path / "raw")
    assert not (tmp_path / "raw").exists() or list((tmp_path / "raw").iterdir()) == []  # nothing left behind


@pytest.mark.parametrize("features, include_leaky, expected", [
    ("clinical", False, ["elevation", "location", "sex"]),
    ("clinical", True, ["elevation", "location", "sex", "management"]),
    ("all", False, CHECKLIST + ["level_of_diagnostic_difficulty", "elevation", "location", "sex"]),
    ("cfcml", False, ["level_of_diagnostic_difficulty", "elevation", "location", "sex", "management"]),
])
def test_feature_sets_and_the_release_case_id_column(derm_source, tmp_path, features, include_leaky, expected):
    """meta.csv's own case_id column is never a feature: tabular.csv has exactly one case_id column."""
    root, _ = derm_source
    folder = convert_derm7pt(root, 32, output=tmp_path, features=features, include_leaky=include_leaky)
    header, table = _read_table(folder)
    assert header == ["case_id", "label", *expected]
    assert {r["case_id"] for r in table} == {f"derm7pt_{i:04d}" for i in range(1, 13)}


def test_release_table_configures_for_cfcml(derm_source, tmp_path):
    """The tabular sidecar passes CFCML's schema check; its class order is dataset.json's index order."""
    from nnunet_ext.cfcml.tabular import TabularTable, infer_schema, load_tabular_json, read_csv_rows

    root, _ = derm_source
    folder = convert_derm7pt(root, 33, output=tmp_path, features="all")
    header, rows = read_csv_rows(folder / "tabular.csv")
    training = [p.name[: -len("_0000.png")] for p in (folder / "imagesTr").iterdir()]
    schema = infer_schema(header, rows, training, load_tabular_json(folder / "tabular.json"))
    table = TabularTable(schema, rows, str(folder / "tabular.csv"))
    table.require(training, labelled=True)
    class_index_order = json.loads((folder / "dataset.json").read_text())["classification_labels"]
    assert class_index_order == ["BCC", "NEV", "MEL", "MISC", "SK"]  # not alphabetical: the order must be read
    assert schema.classes == class_index_order
    by_id = {r["case_id"]: r for r in rows}
    for case in training:  # a class index (what the network predicts) names the case's class via dataset.json
        assert class_index_order[table.rows[case].label] == by_id[case]["label"]


def test_clinic_images_that_are_dermoscopic_are_reported(derm_source, tmp_path):
    root, _ = derm_source
    with pytest.warns(ConversionWarning, match=r"1 case\(s\) whose 'clinic' image is dermoscopic.*derm7pt_0003"):
        folder = convert_derm7pt(root, 34, output=tmp_path, image_column="clinic")
    assert json.loads((folder / "split.json").read_text())["clinic_image_dermoscopic"] == ["derm7pt_0003"]


def test_split_file_replaces_the_index_files(derm_source, derm_dataset, tmp_path):
    root, _ = derm_source
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folder = convert_derm7pt(root, 35, output=tmp_path, split_file=derm_dataset / "split.json")
    assert not [w for w in caught if "indexes.csv" in str(w.message)]
    split = json.loads((folder / "split.json").read_text())
    assert split["list_files"] == [] and split["test"] == [f"derm7pt_{i:04d}" for i in range(10, 13)]


def test_class_without_training_case_left_out_of_the_class_order(derm_source, tmp_path):
    root, rows = derm_source
    source = tmp_path / "source"
    # "seborrheic keratosis" (SK) only in row 3: move that row into the test index file
    _write_source(source, [dict(r) for r in rows])
    (source / "meta" / "test_indexes.csv").write_text("indexes\n3\n9\n10\n11\n")
    (source / "meta" / "train_indexes.csv").write_text("indexes\n0\n1\n2\n4\n5\n6\n")
    with pytest.warns(ConversionWarning, match=r"\['SK'\] have no labelled training case"):
        folder = convert_derm7pt(source, 36, output=tmp_path / "raw")
    classes = json.loads((folder / "tabular.json").read_text())["classes"]
    assert classes == ["BCC", "NEV", "MEL", "MISC"]
    assert json.loads((folder / "dataset.json").read_text())["classification_labels"] == classes
