"""The shared BraTS 2015 FLAIR + T1c cases (2-mm copy) through the command docs/ciml.md gives: region dataset.json,
label files with their original values, the split, and nnU-Net's ``verify_dataset_integrity`` on the result."""
from __future__ import annotations

import json
import re
import shlex

import numpy as np
import pytest
import SimpleITK as sitk
from helpers_cli import BRATS2015_CONVERT_ARGS, BRATS2015_DS2, REPO_DIR

pytestmark = pytest.mark.shared_data

CASES = [f"brats_2013_pat000{i}_1" for i in range(1, 7)]


@pytest.mark.parametrize("doc", ["ciml.md", "conversion.md"])
def test_docs_give_the_tested_command(doc):
    text = re.sub(r"\\\n\s*", " ", (REPO_DIR / "docs" / doc).read_text())
    commands = [shlex.split(line.strip()) for line in text.splitlines()
                if line.strip().startswith("nnunet-ext convert per-case ../shared/data/BraTS2015_FLAIR_T1c/ds2")]
    assert commands == [["nnunet-ext", "convert", "per-case", "../shared/data/BraTS2015_FLAIR_T1c/ds2",
                         *BRATS2015_CONVERT_ARGS]]


def test_dataset_json_declares_the_brats_regions(brats2015_ds2_raw):
    dataset_json = json.loads((brats2015_ds2_raw / "dataset.json").read_text())
    assert dataset_json["channel_names"] == {"0": "FLAIR", "1": "T1c"}
    assert dataset_json["labels"] == {"background": 0, "whole tumour": [1, 2, 3, 4], "tumour core": [1, 3, 4],
                                      "enhancing tumour": 4}
    # edema (2) paints whole tumour, necrosis (1) tumour core, enhancing (4) enhancing tumour
    assert dataset_json["regions_class_order"] == [2, 1, 4]
    assert dataset_json["numTraining"] == 4 and dataset_json["file_ending"] == ".nii.gz"


def test_split_and_files(brats2015_ds2_raw):
    split = json.loads((brats2015_ds2_raw / "split.json").read_text())
    assert len(split["test"]) == 2 and sorted(split["labeled"] + split["test"]) == CASES
    assert split["unlabeled"] == [] and split["unlabeled_only"] == []
    assert sorted(p.name for p in (brats2015_ds2_raw / "imagesTs").iterdir()) == sorted(
        f"{case}_{channel:04d}.nii.gz" for case in split["test"] for channel in (0, 1))
    # the brain masks, licences and the source's README/dataset.json are not converted
    assert sorted(p.name for p in brats2015_ds2_raw.iterdir()) == ["dataset.json", "imagesTr", "imagesTs",
                                                                   "labelsTr", "labelsTs", "split.json"]


def test_label_files_keep_their_values_and_geometry(brats2015_ds2_raw):
    split = json.loads((brats2015_ds2_raw / "split.json").read_text())
    for case, folder in [(split["labeled"][0], "labelsTr"), (split["test"][0], "labelsTs")]:
        source = sitk.ReadImage(str(BRATS2015_DS2 / case / "label.nii.gz"))
        written = sitk.ReadImage(str(brats2015_ds2_raw / folder / f"{case}.nii.gz"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(source))
        assert np.unique(sitk.GetArrayFromImage(written)).tolist() == [0, 1, 2, 3, 4]
        assert written.GetSpacing() == source.GetSpacing() and written.GetOrigin() == source.GetOrigin()


def test_nnunet_verify_dataset_integrity_passes(brats2015_ds2_raw):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(brats2015_ds2_raw), num_processes=1)  # raises on any problem
