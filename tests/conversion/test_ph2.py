"""``convert ph2`` on 12 real PH2 cases (4 per class) with a reduced copy of the real xlsx."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nnunet_ext.conversion.common import ConversionError
from nnunet_ext.conversion.ph2 import CLASS_NAMES, convert_ph2, feature_name, normalise_header, read_ph2_table

openpyxl = pytest.importorskip("openpyxl")
pytestmark = pytest.mark.filterwarnings("ignore::nnunet_ext.conversion.common.ConversionWarning")

PH2 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "PH2"
DIAGNOSIS_HEADERS = ("Common Nevus", "Atypical Nevus", "Melanoma")


def _sample_table(source_xlsx: Path, target: Path, per_class: int = 4, edit=None) -> list[str]:
    """Keep the first ``per_class`` rows of each diagnosis of the real table (header untouched)."""
    book = openpyxl.load_workbook(source_xlsx)
    sheet = book.worksheets[0]
    header = [c.value for c in sheet[1]]
    diagnosis_index = [header.index(h) for h in DIAGNOSIS_HEADERS]
    kept_rows, counts = [], Counter()
    for row in range(2, sheet.max_row + 1):
        values = [c.value for c in sheet[row]]
        column = next(i for i in diagnosis_index if values[i])
        if counts[column] < per_class:
            counts[column] += 1
            kept_rows.append(row)
    kept = sorted(str(sheet.cell(r, 1).value) for r in kept_rows)
    for row in range(sheet.max_row, 1, -1):  # bottom-up so row numbers stay valid
        if row not in kept_rows:
            sheet.delete_rows(row)
    if edit is not None:
        edit(sheet)
    book.save(target)
    return kept


@pytest.fixture(scope="module")
def ph2_source(tmp_path_factory):
    if not PH2.is_dir():
        pytest.skip(f"real data folder {PH2} is absent (see ../shared/data/README.md)")
    source = tmp_path_factory.mktemp("ph2_src")
    (source / "images").mkdir()
    (source / "masks").mkdir()
    names = _sample_table(PH2 / "PH2_dataset2.xlsx", source / "PH2_dataset2.xlsx")
    for name in names:
        shutil.copy(PH2 / "images" / f"{name}.png", source / "images")
        shutil.copy(PH2 / "masks" / f"{name}.png", source / "masks")
    return source, names


@pytest.fixture(scope="module")
def ph2_dataset(ph2_source, tmp_path_factory):
    """The CLI in a fresh process: 3 stratified test cases, half of the 9 training cases labelled."""
    source, _ = ph2_source
    raw = tmp_path_factory.mktemp("raw_ph2")
    cmd = [str(Path(sys.executable).parent / "nnunet-ext"), "convert", "ph2", str(source), "-d", "20", "-o", str(raw),
           "--test", "3", "--labeled", "6", "--seed", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return raw / "Dataset020_PH2"


def test_header_names():
    assert normalise_header("Asymmetry\n(0/1/2)") == "Asymmetry (0/1/2)"
    assert feature_name("Dots/Globules\n(A/AT/T)") == "dots_globules"
    assert feature_name("Blue-Whitish Veil\n(A/P)") == "blue_whitish_veil"


def test_ph2_dataset(ph2_source, ph2_dataset):
    source, names = ph2_source
    folder = ph2_dataset
    dataset_json = json.loads((folder / "dataset.json").read_text())
    assert dataset_json["channel_names"] == {"0": "R", "1": "G", "2": "B"} and dataset_json["file_ending"] == ".png"
    assert dataset_json["labels"] == {"background": 0, "lesion": 1}
    assert dataset_json["classification_labels"] == list(CLASS_NAMES) and dataset_json["numTraining"] == 6
    split = json.loads((folder / "split.json").read_text())
    assert split["class_counts"]["test"] == {c: 1 for c in CLASS_NAMES}  # stratified
    assert split["class_counts"]["labeled"] == {c: 2 for c in CLASS_NAMES}
    with open(folder / "tabular.csv", newline="") as f:
        rows = {r["case_id"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == names
    columns = list(next(iter(rows.values())))
    assert columns[:2] == ["case_id", "label"] and "histological_diagnosis" not in columns
    assert {"asymmetry", "pigment_network", "dots_globules", "blue_whitish_veil", "light_brown", "black"} <= \
        set(columns)
    assert all(rows[c]["label"] == "" for c in split["unlabeled"])  # hidden like the masks
    assert {rows[c]["label"] for c in split["labeled"] + split["test"]} == set(CLASS_NAMES)
    assert {r["black"] for r in rows.values()} <= {"0", "1"}  # colour flags: empty cell = absent
    assert rows["IMD003"]["dark_brown"] == "1" and rows["IMD003"]["white"] == "0"  # first row of the real table
    assert rows["IMD003"]["asymmetry"] == "0" and rows["IMD003"]["pigment_network"] == "T"

    case = split["labeled"][0]
    image = np.asarray(Image.open(folder / "imagesTr" / f"{case}_0000.png"))
    np.testing.assert_array_equal(image, np.asarray(Image.open(source / "images" / f"{case}.png").convert("RGB")))
    mask = np.asarray(Image.open(folder / "labelsTr" / f"{case}.png"))
    np.testing.assert_array_equal(mask, (np.asarray(Image.open(source / "masks" / f"{case}.png")) > 0))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    assert not (folder / "labelsTr" / f"{split['unlabeled'][0]}.png").exists()
    assert (folder / "imagesUnlabeled" / f"{split['unlabeled'][0]}_0000.png").is_file()
    assert (folder / "labelsTs" / f"{split['test'][0]}.png").is_file()
    # nnU-Net's own reader sees three channels in the single file
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

    data, _ = NaturalImage2DIO().read_images([str(folder / "imagesTr" / f"{case}_0000.png")])
    assert data.shape[0] == 3 and data.shape[1] == 1


def test_leaky_column_only_on_request(ph2_source):
    source, _ = ph2_source
    _, features, columns = read_ph2_table(source / "PH2_dataset2.xlsx", include_leaky=True)
    assert "histological_diagnosis" in columns
    assert "histological_diagnosis" not in read_ph2_table(source / "PH2_dataset2.xlsx")[2]


def test_ph2_bad_tables(ph2_source, tmp_path):
    source, _ = ph2_source

    def drop_diagnosis(sheet):
        sheet.delete_cols(3, 3)

    _sample_table(source / "PH2_dataset2.xlsx", tmp_path / "no_diagnosis.xlsx", edit=drop_diagnosis)
    with pytest.raises(ConversionError, match=r"no_diagnosis.xlsx: no column\(s\) \['Common Nevus'"):
        read_ph2_table(tmp_path / "no_diagnosis.xlsx")

    def double_mark(sheet):
        sheet.cell(2, 5).value = "X"
        sheet.cell(2, 4).value = "X"

    _sample_table(source / "PH2_dataset2.xlsx", tmp_path / "double.xlsx", edit=double_mark)
    with pytest.raises(ConversionError, match=r"double.xlsx: image IMD\d+ \(row 2\) has \d diagnosis marks"):
        read_ph2_table(tmp_path / "double.xlsx")

    broken = tmp_path / "broken_src"
    shutil.copytree(source, broken)
    name = sorted(p.stem for p in (broken / "masks").iterdir())[0]
    (broken / "masks" / f"{name}.png").unlink()
    with pytest.raises(ConversionError, match=f"case {name}: missing lesion mask"):
        convert_ph2(broken, 21, output=tmp_path / "raw")
    assert not (tmp_path / "raw").exists() or list((tmp_path / "raw").iterdir()) == []  # nothing left behind
