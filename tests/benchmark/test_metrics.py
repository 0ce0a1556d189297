"""Test-split evaluation: HD95/ASD wrapper (spacing, empty masks) and nnU-Net Dice + HD95 over a folder."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ext.benchmark.metrics import evaluate_folder, summarise_values, surface_distances


def _points(shape, *points):
    mask = np.zeros(shape, dtype=bool)
    for p in points:
        mask[p] = True
    return mask


# single-voxel masks: the surface is the voxel itself, so every surface distance is the spacing-weighted offset
@pytest.mark.parametrize("shape, pred_at, ref_at, spacing, expected", [
    ((6, 6, 6), (0, 0, 3), (0, 0, 0), (1, 1, 2), 6.0),          # 3 voxels along an axis of 2 mm
    ((6, 6, 6), (0, 3, 0), (0, 0, 0), (2, 0.5, 1), 1.5),        # spacing applies in array order
    ((6, 6, 6), (2, 2, 2), (2, 2, 2), None, 0.0),               # identical
    ((7, 7), (1, 1), (4, 5), (1, 1), 5.0),                      # 2D, 3-4-5 triangle
    ((7, 7), (1, 1), (4, 5), None, 5.0),                        # no spacing = voxel units
    ((7, 7), (1, 1), (1, 4), (1, 0.25), 0.75),
])
def test_surface_distances_known_values(shape, pred_at, ref_at, spacing, expected):
    result = surface_distances(_points(shape, pred_at), _points(shape, ref_at), spacing)
    assert result["HD95"] == pytest.approx(expected)
    assert result["ASD"] == pytest.approx(expected)


def test_surface_distances_of_shifted_cubes_are_bounded_by_the_shift():
    ref = np.zeros((16, 16, 16), bool)
    ref[4:10, 4:10, 4:10] = True
    pred = np.roll(ref, 2, axis=0)
    result = surface_distances(pred, ref, (1.5, 1.0, 1.0))
    assert 0.0 < result["ASD"] < result["HD95"] <= 3.0 + 1e-9  # 2 voxels x 1.5 mm at most


@pytest.mark.parametrize("pred_empty, ref_empty, expected", [
    (True, True, math.nan),    # nothing to measure
    (True, False, math.inf),   # missed structure
    (False, True, math.inf),   # hallucinated structure
])
def test_surface_distances_empty_masks(pred_empty, ref_empty, expected):
    full = _points((5, 5, 5), (2, 2, 2))
    empty = np.zeros((5, 5, 5), bool)
    result = surface_distances(empty if pred_empty else full, empty if ref_empty else full, (1, 1, 1))
    for value in result.values():
        assert (math.isnan(value) and math.isnan(expected)) or value == expected


@pytest.mark.parametrize("pred, ref, spacing, message", [
    (np.ones((3, 3, 3)), np.ones((3, 3, 4)), None, "shape"),
    (np.ones((2, 2, 2, 2)), np.ones((2, 2, 2, 2)), None, "2D or 3D"),
    (np.ones((3, 3, 3)), np.ones((3, 3, 3)), (1, 1), "entries"),
    (np.ones((3, 3, 3)), np.ones((3, 3, 3)), (1, 0, 1), "positive"),
])
def test_surface_distances_bad_input(pred, ref, spacing, message):
    with pytest.raises(ValueError, match=message):
        surface_distances(pred, ref, spacing)


@pytest.mark.parametrize("values, mean, n_finite, n_nan, n_inf", [
    ([1.0, 2.0, math.nan, math.inf], 1.5, 2, 1, 1),
    ([math.inf, math.nan], math.inf, 0, 1, 1),
    ([math.nan], math.nan, 0, 1, 0),
    ([], math.nan, 0, 0, 0),
    ([4.0], 4.0, 1, 0, 0),
])
def test_summarise_values(values, mean, n_finite, n_nan, n_inf):
    result = summarise_values(values)
    assert (math.isnan(result["mean"]) and math.isnan(mean)) or result["mean"] == mean
    assert (result["n_finite"], result["n_nan"], result["n_inf"]) == (n_finite, n_nan, n_inf)


def _write(array_zyx: np.ndarray, path, spacing_xyz=(1.0, 1.0, 2.0)):
    image = sitk.GetImageFromArray(array_zyx.astype(np.uint8))
    image.SetSpacing(spacing_xyz)
    sitk.WriteImage(image, str(path))


@pytest.fixture
def folders(tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    shape = (8, 8, 8)
    # case_a: label 1 one voxel, predicted 3 slices away along z (2 mm slices): 6 mm; label 2 exact
    a_ref, a_pred = np.zeros(shape), np.zeros(shape)
    a_ref[0, 0, 0] = 1
    a_pred[3, 0, 0] = 1
    a_ref[7, 7, 7] = a_pred[7, 7, 7] = 2
    # case_b: label 1 missed entirely (Dice 0, HD95 inf); label 2 absent in both (Dice NaN, HD95 NaN)
    b_ref, b_pred = np.zeros(shape), np.zeros(shape)
    b_ref[4, 4, 4] = 1
    for name, r, p in (("case_a", a_ref, a_pred), ("case_b", b_ref, b_pred)):
        _write(r, ref / f"{name}.nii.gz")
        _write(p, pred / f"{name}.nii.gz")
    dataset_json = tmp_path / "dataset.json"
    dataset_json.write_text(json.dumps({"labels": {"background": 0, "anterior": 1, "posterior": 2},
                                        "file_ending": ".nii.gz", "channel_names": {"0": "MRI"}}))
    plans = tmp_path / "plans.json"
    plans.write_text("{}")
    return ref, pred, dataset_json, plans


def test_evaluate_folder_dice_from_nnunet_and_hd95_in_mm(folders, tmp_path):
    ref, pred, dataset_json, plans = folders
    result = evaluate_folder(ref, pred, dataset_json, plans, tmp_path / "evaluation.json")
    assert result["labels"] == {"1": "anterior", "2": "posterior"}
    cases = {c["case"]: c["metrics"] for c in result["per_case"]}
    assert cases["case_a"]["1"]["Dice"] == 0.0 and cases["case_a"]["1"]["HD95"] == pytest.approx(6.0)
    assert cases["case_a"]["2"]["Dice"] == 1.0 and cases["case_a"]["2"]["HD95"] == 0.0
    assert cases["case_b"]["1"]["Dice"] == 0.0 and cases["case_b"]["1"]["HD95"] == math.inf
    assert math.isnan(cases["case_b"]["2"]["Dice"]) and math.isnan(cases["case_b"]["2"]["HD95"])
    assert result["mean"]["1"]["Dice"] == 0.0 and result["mean"]["2"]["Dice"] == 1.0   # NaN case left out
    assert result["mean"]["1"]["HD95"] == {"mean": pytest.approx(6.0), "n_finite": 1, "n_nan": 0, "n_inf": 1}
    assert result["mean"]["2"]["HD95"] == {"mean": 0.0, "n_finite": 1, "n_nan": 1, "n_inf": 0}
    assert result["foreground_mean"]["Dice"] == 0.5 and result["foreground_mean"]["HD95"] == pytest.approx(3.0)
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert saved["per_case"][1]["metrics"]["1"]["HD95"] == math.inf  # Infinity survives the JSON round trip


def test_evaluate_folder_names_the_case_without_prediction(folders):
    ref, pred, dataset_json, plans = folders
    (pred / "case_b.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="case_b"):
        evaluate_folder(ref, pred, dataset_json, plans)


def test_evaluate_folder_without_references(folders, tmp_path):
    _, pred, dataset_json, plans = folders
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no reference"):
        evaluate_folder(tmp_path / "empty", pred, dataset_json, plans)


def test_evaluate_folder_scores_each_region_on_its_union_of_labels(tmp_path):
    """A region dataset (BraTS-style, nnU-Net's ``regions_class_order``): Dice and HD95 per region, each on the
    union of its labels in the reference and in the prediction (which nnU-Net writes in region-order labels)."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    reference = np.zeros((8, 8, 8))
    reference[2:6, 2:6, 2:6] = 2  # edema
    reference[3, 3, 3] = 1  # necrosis
    reference[4, 4, 4] = 4  # enhancing
    prediction = np.zeros((8, 8, 8))
    prediction[2:6, 2:6, 2:6] = 2  # whole tumour painted with regions_class_order[0]
    prediction[4, 4, 4] = 4  # the core found at one voxel, which is enhancing (the necrosis voxel is missed)
    _write(reference, ref / "case.nii.gz")
    _write(prediction, pred / "case.nii.gz")
    dataset_json = tmp_path / "dataset.json"
    dataset_json.write_text(json.dumps({
        "labels": {"background": 0, "whole tumour": [1, 2, 3, 4], "tumour core": [1, 3, 4], "enhancing tumour": 4},
        "regions_class_order": [2, 1, 4], "file_ending": ".nii.gz", "channel_names": {"0": "FLAIR", "1": "T1c"}}))
    plans = tmp_path / "plans.json"
    plans.write_text("{}")
    result = evaluate_folder(ref, pred, dataset_json, plans)
    assert result["labels"] == {"(1, 2, 3, 4)": "whole tumour", "(1, 3, 4)": "tumour core", "4": "enhancing tumour"}
    metrics = result["per_case"][0]["metrics"]
    assert metrics["(1, 2, 3, 4)"]["Dice"] == 1.0 and metrics["(1, 2, 3, 4)"]["HD95"] == 0.0
    assert metrics["(1, 3, 4)"]["Dice"] == pytest.approx(2 / 3)  # 1 of 2 core voxels found, none extra
    core_ref, core_pred = np.isin(reference, (1, 3, 4)), np.isin(prediction, (1, 3, 4))
    expected = surface_distances(core_pred, core_ref, (2.0, 1.0, 1.0))  # array order: z slices are 2 mm
    assert metrics["(1, 3, 4)"]["HD95"] == pytest.approx(expected["HD95"]) and expected["HD95"] > 0
    assert metrics["4"]["Dice"] == 1.0 and metrics["4"]["HD95"] == 0.0
    assert result["foreground_mean"]["Dice"] == pytest.approx((1 + 2 / 3 + 1) / 3)
