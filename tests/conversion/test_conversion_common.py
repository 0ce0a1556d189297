"""Label conversion, option parsing and the output-folder rules shared by every converter."""
from __future__ import annotations

import numpy as np
import pytest

from nnunet_ext.conversion.common import (
    ConversionError,
    ConversionWarning,
    DatasetWriter,
    LabelConverter,
    dataset_folder_name,
    file_ending,
    parse_label_map,
    parse_label_names,
    strip_ending,
)
from nnunet_ext.conversion.splits import Split


@pytest.mark.parametrize("array, labels, value_map, expected", [
    (np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32), None, None, [[0, 1], [1, 0]]),
    (np.array([0, 255, 255], dtype=np.uint8), {"background": 0, "lesion": 1}, {255: 1}, [0, 1, 1]),
    (np.array([0, 1, 2, 4], dtype=np.int16), None, {4: 3}, [0, 1, 2, 3]),
    (np.array([True, False]), None, None, [1, 0]),
])
def test_label_conversion_values(array, labels, value_map, expected):
    converted = LabelConverter(labels, value_map).convert(array, "x.nii.gz")
    assert converted.dtype == np.uint8
    np.testing.assert_array_equal(converted, expected)


@pytest.mark.parametrize("array, labels, message", [
    (np.array([0.0, 0.5]), None, "non-integer values"),
    (np.array([0.0, np.nan]), None, "NaN"),
    (np.array([0, -1]), None, "negative label value"),
    (np.array([0, 1, 2]), {"background": 0, "a": 1}, r"label values \[2\] are not in dataset.json"),
    (np.array(["a"]), None, "unsupported type"),
])
def test_label_conversion_errors_name_the_file(array, labels, message):
    with pytest.raises(ConversionError, match=f"case_7.nii.gz: .*{message}"):
        LabelConverter(labels).convert(array, "case_7.nii.gz")


def test_inferred_labels_and_gaps():
    converter = LabelConverter()
    converter.convert(np.array([0, 2]), "a")
    converter.convert(np.array([1]), "b")
    assert converter.dataset_labels() == {"background": 0, "label_1": 1, "label_2": 2}
    gappy = LabelConverter()
    gappy.convert(np.array([0, 4]), "c")
    with pytest.raises(ConversionError, match=r"not 0, 1, 2.*--label-map"):
        gappy.dataset_labels()


@pytest.mark.parametrize("labels, message", [
    ({"background": 0, "a": 2}, "without gaps"),
    ({"zero": 0, "a": 1}, "'background'"),
])
def test_declared_labels_are_checked(labels, message):
    with pytest.raises(ConversionError, match=message):
        LabelConverter(labels)


def test_option_parsing():
    assert parse_label_names(["background=0", "whole_tumour=1"]) == {"background": 0, "whole_tumour": 1}
    assert parse_label_map(["255=1", "4=3"]) == {255: 1, 4: 3}
    assert parse_label_names(None) is None and parse_label_map([]) is None
    with pytest.raises(ConversionError, match="expected NAME=VALUE"):
        parse_label_names(["background"])
    with pytest.raises(ConversionError, match="must be integers"):
        parse_label_map(["a=1"])


@pytest.mark.parametrize("name, ending, stem", [
    ("case_1.nii.gz", ".nii.gz", "case_1"),
    ("CASE.NII", ".nii", "CASE"),
    ("x.nrrd", ".nrrd", "x"),
    ("notes.txt", None, "notes.txt"),
])
def test_file_endings(name, ending, stem):
    assert file_ending(name) == ending and strip_ending(name) == stem


@pytest.mark.parametrize("dataset_id, name", [(0, "A"), (1000, "A"), (5, "has space"), (5, "a/b"), (5, "")])
def test_bad_dataset_names(dataset_id, name):
    with pytest.raises(ConversionError):
        dataset_folder_name(dataset_id, name)


def _tiny_dataset(writer: DatasetWriter) -> Split:
    """One 2D-as-3D case written through SimpleITK so that nnU-Net's integrity check passes."""
    import SimpleITK as sitk

    for part in ("labeled",):
        sitk.WriteImage(sitk.GetImageFromArray(np.ones((2, 4, 4), np.float32)), str(writer.image_path(part, "c1")))
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 4, 4), np.uint8)), str(writer.label_path(part, "c1")))
    return Split(labeled=["c1"], unlabeled=[], test=[])


def test_writer_refuses_overwrite_and_keeps_old_data_on_failure(tmp_path):
    dataset_json = {"name": "T", "channel_names": {"0": "x"}, "labels": {"background": 0}}
    with DatasetWriter(tmp_path, 7, "T") as writer:
        with pytest.warns(ConversionWarning, match="only 1 labelled training case"):
            first = writer.finish(dataset_json, _tiny_dataset(writer))
    assert (first / "dataset.json").is_file() and (first / "split.json").is_file()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # staging folder moved away
    with pytest.raises(FileExistsError, match="--overwrite"):
        DatasetWriter(tmp_path, 7, "T")
    with pytest.raises(ConversionError, match=f"already used by {tmp_path / 'Dataset007_T'}"):
        DatasetWriter(tmp_path, 7, "Other")
    # A failed overwrite leaves the old dataset untouched and no staging folder behind.
    with pytest.raises(RuntimeError, match="boom"):
        with DatasetWriter(tmp_path, 7, "T", overwrite=True) as writer:
            _tiny_dataset(writer)
            raise RuntimeError("boom")
    assert (first / "imagesTr" / "c1_0000.nii.gz").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset007_T"]


def test_writer_refuses_output_inside_input(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    with pytest.raises(ConversionError, match="overlaps the input"):
        DatasetWriter(source, 3, "X", sources=[source])
    with pytest.raises(ConversionError, match="overlaps the input"):
        DatasetWriter(tmp_path, 3, "X", sources=[tmp_path / "Dataset003_X" / "inner"])


@pytest.mark.parametrize("variable", ["nnUNet_preprocessed", "nnUNet_results"])
def test_writer_refuses_a_dataset_id_used_in_preprocessed_or_results(tmp_path, monkeypatch, variable):
    raw, other = tmp_path / "raw", tmp_path / variable
    (other / "Dataset043_Foo").mkdir(parents=True)
    monkeypatch.setenv(variable, str(other))
    with pytest.raises(ConversionError, match=f"already used by {other / 'Dataset043_Foo'}"):
        DatasetWriter(raw, 43, "Bar")
    assert not raw.exists()  # refused before anything was created
    DatasetWriter(raw, 43, "Foo")  # the same dataset (e.g. re-converted after planning) is no conflict
    DatasetWriter(raw, 44, "Bar")


@pytest.mark.parametrize("layout, extra", [
    ("ph2", []),
    ("derm7pt", []),
    ("folders", ["-n", "X"]),
    ("per-case", ["-n", "X", "--modalities", "T1", "--label", "seg"]),
    ("h5", ["-n", "X", "--spacing", "1", "1", "1"]),
    ("acdc-h5", ["--spacing", "1", "1", "1"]),
])
def test_missing_source_folder_is_reported_as_such(tmp_path, capsys, layout, extra):
    from nnunet_ext.cli import main

    missing = tmp_path / "nonexistent"
    assert main(["convert", layout, str(missing), "-d", "5", "-o", str(tmp_path / "raw"), *extra]) == 2
    output = capsys.readouterr()
    assert f"{missing}: not found" in output.out + output.err
    assert not (tmp_path / "raw").exists()
